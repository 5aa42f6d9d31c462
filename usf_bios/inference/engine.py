"""The inference engine: base models loaded once on first use, many adapters per base, a bounded queue, one worker.

``submit`` puts a request in the queue (``QueueFull`` when ``queue_size`` already wait) and returns a
``Generation``: the tokens' text as it is decoded, then how the request finished and its token counts. One worker
thread takes the oldest request and, with it, the other waiting ones of the same base (up to ``max_batch``, with at
most ``max_adapters`` distinct adapters), and decodes them as one batch (``generate.run_batch``). Bases load lazily,
are kept while used, and are unloaded after ``idle_s`` seconds without a request. Knows nothing of HTTP or of the
job store: a request names its base folder and adapter folder (``loaded.Target``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import torch

from usf_bios.inference.generate import Row, run_batch
from usf_bios.inference.loaded import BaseKey, LoadedBase, Target
from usf_bios.inference.sampling import RequestError, SamplingParams
from usf_bios.inference.vllm_base import VllmBase, resolve_backend

log = logging.getLogger("usf_bios.inference")


class QueueFull(RuntimeError):
    """As many requests as the queue holds are waiting already (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """The engine is shut down, or the request's model could not be loaded (HTTP 503)."""


@dataclass
class Completion:
    """A finished request: its text, why it stopped (stop | length | cancelled) and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Generation:
    """The stream of one request: ('start', prompt_tokens), ('text', delta)…, ('done', finish_reason, tokens) or
    ('error', exception). Read it with ``for item in gen`` (blocking) or ``async for item in gen.aiter()`` when it
    was made with an event loop; ``cancel()`` stops the decoding at the next token."""

    def __init__(self, target: Target, messages: list[dict[str, str]] | None, prompt: str | None,
                 params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None):
        self.target, self.messages, self.prompt, self.params = target, messages, prompt, params
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._loop = loop
        self._async: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._sync: queue.SimpleQueue = queue.SimpleQueue()

    def deliver(self, item: tuple) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)  # type: ignore[union-attr]
            except RuntimeError:   # the loop is closed: the client is gone
                self.cancelled = True
        else:
            self._sync.put(item)

    def fail(self, exc: Exception) -> None:
        self.deliver(("error", exc))

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self._sync.get()
            yield item
            if item[0] in ("done", "error"):
                return

    async def aiter(self) -> AsyncIterator[tuple]:
        assert self._async is not None, "made without an event loop"
        while True:
            item = await self._async.get()
            yield item
            if item[0] in ("done", "error"):
                return

    @staticmethod
    def collect(items: Any) -> Completion:
        """The whole completion from the items of a stream (raises the request's error)."""
        text, prompt_tokens = [], 0
        for item in items:
            if item[0] == "start":
                prompt_tokens = item[1]
            elif item[0] == "text":
                text.append(item[1])
            elif item[0] == "error":
                raise item[1]
            elif item[0] == "done":
                return Completion("".join(text), item[1], prompt_tokens, item[2])
        raise EngineUnavailable("the stream ended early")

    def result(self) -> Completion:
        return self.collect(iter(self))


class InferenceEngine:
    def __init__(self, max_adapters: int = 8, idle_s: float = 900.0, queue_size: int = 32, max_batch: int = 8,
                 device: torch.device | None = None, backend: str = "transformers"):
        self.max_adapters, self.idle_s, self.queue_size, self.max_batch = max_adapters, idle_s, queue_size, max_batch
        self.device = device
        self.backend = resolve_backend(backend)   # transformers | vllm (vllm_base.py; QLoRA bases stay on transformers)
        self.bases: dict[BaseKey, LoadedBase | VllmBase] = {}
        self.base_loads: Counter[BaseKey] = Counter()
        self.batches = self.requests = 0
        self._pending: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the caller's side ---------------------------------------------------------------------------------------
    def submit(self, target: Target, *, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
               params: SamplingParams = SamplingParams(), loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue a chat (``messages``) or a plain completion (``prompt``); QueueFull or EngineUnavailable at once."""
        gen = Generation(target, messages, prompt, params, loop)
        with self._cond:
            if self._closed:
                raise EngineUnavailable("the inference engine is shut down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (USF_INFERENCE_QUEUE="
                                f"{self.queue_size}); try again shortly")
            self._pending.append(gen)
            self.requests += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="usf-inference", daemon=True)
                self._thread.start()
            self._cond.notify()
        return gen

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for gen in waiting:
            gen.fail(EngineUnavailable("the inference engine is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
        for base in self.bases.values():
            if isinstance(base, VllmBase):
                base.close()
        self.bases.clear()

    def describe(self) -> dict[str, Any]:
        bases = list(self.bases.values())
        return {"bases": [{**b.describe(), "loads": self.base_loads[b.key]} for b in bases],
                "backend": self.backend,
                "waiting": len(self._pending), "queue_size": self.queue_size, "max_batch": self.max_batch,
                "max_loaded_adapters": self.max_adapters, "idle_unload_s": self.idle_s,
                "requests": self.requests, "batches": self.batches}

    # -- the worker ----------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Generation] | None:
        with self._cond:
            while not self._pending and not self._closed:
                if not self._cond.wait(timeout=max(0.05, min(self.idle_s / 2, 5.0))):
                    return []
            if self._closed:
                return None
            first = self._pending.popleft()
            batch, adapters = [first], {first.target.adapter} - {None}
            for gen in list(self._pending):
                if len(batch) >= self.max_batch:
                    break
                if gen.target.base != first.target.base:
                    continue
                more = adapters | ({gen.target.adapter} - {None})
                if len(more) > self.max_adapters:
                    continue
                self._pending.remove(gen)
                batch.append(gen)
                adapters = more
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._unload_idle()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - every request of the batch hears of it
                log.exception("inference: a batch failed")
                for gen in batch:
                    gen.fail(exc if isinstance(exc, (RequestError, EngineUnavailable)) else
                             EngineUnavailable(f"generation failed: {type(exc).__name__}: {exc}"))

    def _base(self, key: BaseKey) -> LoadedBase | VllmBase:
        base = self.bases.get(key)
        if base is None:
            kind = VllmBase if self.backend == "vllm" and key.quantization == "none" else LoadedBase
            try:
                base = kind(key, self.max_adapters, self.device)
            except Exception as exc:  # noqa: BLE001 - a folder that does not load: the reason goes to the client
                log.exception("inference: base %s did not load", key.path)
                raise EngineUnavailable(f"the model could not be loaded: {type(exc).__name__}: {exc}") from None
            self.bases[key] = base
            self.base_loads[key] += 1
        base.last_used = time.monotonic()
        return base

    def _run(self, batch: list[Generation]) -> None:
        base = self._base(batch[0].target.base)
        if isinstance(base, VllmBase):
            self._run_continuous(base, batch)
            return
        rows: list[Row] = []
        for gen in batch:
            try:
                ids = base.encode_chat(gen.messages) if gen.messages is not None else base.encode_prompt(gen.prompt or "")
                row = Row(gen, ids, gen.target.adapter, gen.params, base.max_new_tokens(len(ids), gen.params.max_tokens))
            except RequestError as exc:
                gen.fail(exc)
                continue
            gen.deliver(("start", len(ids)))
            rows.append(row)
        if not rows:
            return
        try:
            base.use_adapters({r.adapter for r in rows if r.adapter})
        except RequestError as exc:
            for row in rows:
                row.gen.fail(exc)
            return
        self.batches += 1
        run_batch(base, rows)
        base.last_used = time.monotonic()

    def _run_continuous(self, base: VllmBase, batch: list[Generation]) -> None:
        """vLLM's continuous batching: the waiting requests of this base join the batch at each step, up to
        ``max_batch`` at once; a request leaves it when it ends."""
        self.batches += 1
        self._admit(base, batch)
        while base.live:
            try:
                base.step()
            except Exception as exc:  # noqa: BLE001 - every request in the batch hears of it
                log.exception("inference: a vLLM step failed")
                base.fail_all(EngineUnavailable(f"generation failed: {type(exc).__name__}: {exc}"))
                return
            base.last_used = time.monotonic()
            if len(base.live) < self.max_batch:
                self._admit(base, self._waiting_for(base.key, self.max_batch - len(base.live)))

    def _admit(self, base: VllmBase, gens: list[Generation]) -> None:
        for gen in gens:
            try:
                ids = base.encode_chat(gen.messages) if gen.messages is not None else base.encode_prompt(gen.prompt or "")
                base.add(gen, ids, base.max_new_tokens(len(ids), gen.params.max_tokens))
            except RequestError as exc:
                gen.fail(exc)
                continue
            gen.deliver(("start", len(ids)))

    def _waiting_for(self, key: BaseKey, room: int) -> list[Generation]:
        """Up to ``room`` waiting requests of this base, taken from the queue (oldest first)."""
        with self._cond:
            taken = [gen for gen in self._pending if gen.target.base == key][:room]
            for gen in taken:
                self._pending.remove(gen)
        return taken

    def _unload_idle(self) -> None:
        now = time.monotonic()
        for key, base in list(self.bases.items()):
            if now - base.last_used >= self.idle_s:
                log.info("inference: unloading base %s (idle %.0f s, USF_INFERENCE_IDLE_S=%g)", key.path,
                         now - base.last_used, self.idle_s)
                del self.bases[key]
                if isinstance(base, VllmBase):
                    base.close()
                del base
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
