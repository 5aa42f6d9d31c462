"""OpenAI-compatible inference: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(non-streaming, and ``stream: true`` as Server-Sent Events ending in ``data: [DONE]``), and the engine's state for
admins at ``GET /api/inference``. A model is a registered base or a completed job's adapter (control/serving.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from usf_bios.api.deps import AdminCaller, LayoutDep, SessionDep
from usf_bios.api.routes.openai_common import EngineDep, OpenAICaller, OpenAIRoute, error_for
from usf_bios.control.errors import Invalid
from usf_bios.control.serving import list_served, resolve_served
from usf_bios.inference.engine import Generation, InferenceEngine
from usf_bios.inference.loaded import BaseKey, Target, serving_quantization
from usf_bios.inference.sampling import SamplingParams

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
admin_router = APIRouter(tags=["system"])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=400)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def params(self, max_tokens: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              max_tokens=max_tokens or self.max_tokens, stop=stop, seed=self.seed)


class ChatCompletionCreate(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)


class CompletionCreate(_Sampling):
    prompt: str | list[str] = Field(..., description="one prompt")


def _text(message: ChatMessage, index: int) -> dict[str, str]:
    if isinstance(message.content, list):
        if any(part.type != "text" for part in message.content):
            raise Invalid(f"messages.{index}.content", "only text parts are supported")
        content = "".join(part.text or "" for part in message.content)
    else:
        content = message.content or ""
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def _target(session: Any, caller: Any, layout: Any, model: str) -> Target:
    served = resolve_served(session=session, caller=caller, layout=layout, ref=model)
    key = BaseKey(served.base_path, serving_quantization(served.quantization), served.trust_remote_code)
    return Target(key, served.adapter_path)


@router.get("/models")
def list_models(caller: OpenAICaller, session: SessionDep) -> dict[str, Any]:
    """Registered base models and every completed job's adapter (``ft:<base>:<job name>:<job id>``)."""
    data = [{"id": m.id, "object": "model", "created": int(m.created.timestamp()), "owned_by": "usf-bios",
             "kind": m.kind} for m in list_served(session=session, caller=caller)]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def get_model(model: str, caller: OpenAICaller, session: SessionDep, layout: LayoutDep) -> dict[str, Any]:
    served = resolve_served(session=session, caller=caller, layout=layout, ref=model)
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "usf-bios",
            "kind": "adapter" if served.adapter_path else "base"}


async def _started(gen: Generation) -> AsyncIterator[tuple]:
    """The generation's items; the first (its start or its error) is awaited before the answer begins."""
    items = gen.aiter()
    first = await items.__anext__()
    if first[0] == "error":
        raise first[1]

    async def rest() -> AsyncIterator[tuple]:
        yield first
        async for item in items:
            yield item

    return rest()


def _submit(engine: InferenceEngine, target: Target, body: _Sampling, **what: Any) -> Generation:
    max_tokens = getattr(body, "max_completion_tokens", None)
    return engine.submit(target, params=body.params(max_tokens), loop=asyncio.get_running_loop(), **what)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(items: AsyncIterator[tuple], gen: Generation, chunk: Any, include_usage: bool) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        prompt_tokens = 0
        try:
            async for item in items:
                if item[0] == "start":
                    prompt_tokens = item[1]
                    yield f"data: {json.dumps(chunk(role=True))}\n\n"
                elif item[0] == "text":
                    yield f"data: {json.dumps(chunk(text=item[1]))}\n\n"
                elif item[0] == "done":
                    usage = _usage(prompt_tokens, item[2])
                    yield f"data: {json.dumps(chunk(finish=item[1], usage=usage))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps({**chunk(), 'choices': [], 'usage': usage})}\n\n"
                elif item[0] == "error":
                    answer = error_for(item[1])
                    body = json.loads(answer.body) if answer is not None else {"error": {"message": str(item[1])}}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()   # the client went away: the engine stops at the next token

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionCreate, caller: OpenAICaller, session: SessionDep, layout: LayoutDep,
                           engine: EngineDep) -> Any:
    """A chat completion from a base model or an adapter, with the model's chat template."""
    target = await run_in_threadpool(_target, session, caller, layout, body.model)
    messages = [_text(m, i) for i, m in enumerate(body.messages)]
    gen = _submit(engine, target, body, messages=messages)
    items = await _started(gen)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        def chunk(role: bool = False, text: str | None = None, finish: str | None = None,
                  usage: dict[str, int] | None = None) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            out: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                   "model": body.model, "system_fingerprint": None,
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                out["usage"] = usage
            return out

        return _sse(items, gen, chunk, bool(body.stream_options and body.stream_options.include_usage))
    done = Generation.collect([item async for item in items])
    return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done.prompt_tokens, done.completion_tokens)}


@router.post("/completions")
async def completions(body: CompletionCreate, caller: OpenAICaller, session: SessionDep, layout: LayoutDep,
                      engine: EngineDep) -> Any:
    """A plain-text completion of ``prompt`` (no chat template)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise Invalid("prompt", "send one prompt per request")
        prompt = prompt[0]
    target = await run_in_threadpool(_target, session, caller, layout, body.model)
    gen = _submit(engine, target, body, prompt=prompt)
    items = await _started(gen)
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    if body.stream:
        def chunk(role: bool = False, text: str | None = None, finish: str | None = None,
                  usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                                   "choices": [choice(text or "", finish)]}
            if usage is not None:
                out["usage"] = usage
            return out

        return _sse(items, gen, chunk, bool(body.stream_options and body.stream_options.include_usage))
    done = Generation.collect([item async for item in items])
    return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
            "choices": [choice(done.text, done.finish_reason)], "usage": _usage(done.prompt_tokens, done.completion_tokens)}


@admin_router.get("/inference")
def inference_state(_admin: AdminCaller, request: Request) -> dict[str, Any]:
    """The inference engine: loaded bases (and how often each was loaded), their adapters (least recently used
    first), the queue."""
    return request.app.state.inference.describe()
