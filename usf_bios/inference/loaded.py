"""A base model loaded once, its tokenizer, and the LRU of its peft adapters (loaded by folder, switched per batch)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from usf_bios.inference.prompts import Encoder
from usf_bios.inference.sampling import RequestError

log = logging.getLogger("usf_bios.inference")
BASE_ADAPTER = "__base__"   # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class BaseKey:
    """What identifies a loaded base: its folder, how it is quantized, whether its own code may run."""

    path: str
    quantization: str = "none"       # none | 4bit | 8bit (only where CUDA and bitsandbytes are present)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Target:
    """What one request runs on: a base, and an adapter folder on it (None: the base alone)."""

    base: BaseKey
    adapter: str | None = None


def serving_quantization(requested: str) -> str:
    """The quantization a base is served in: the adapter's own (QLoRA on its 4-bit base) where CUDA and
    bitsandbytes are present, else none (the adapter then runs on the unquantized base)."""
    if requested == "none" or not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return "none"
    return requested


def adapter_name(folder: str) -> str:
    return "a" + hashlib.sha1(folder.encode()).hexdigest()[:12]


class LoadedBase(Encoder):
    """One base model in memory with up to ``max_adapters`` adapters; used only from the engine's worker thread."""

    backend = "transformers"

    def __init__(self, key: BaseKey, max_adapters: int, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        self.key, self.max_adapters = key, max_adapters
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        log.info("inference: loading base %s (%s, %s)", key.path, self.device, str(self.dtype).removeprefix("torch."))
        extra: dict[str, Any] = {}
        if key.quantization != "none":
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_use_double_quant=True,
                                                               bnb_4bit_compute_dtype=self.dtype)
                                            if key.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
            extra["device_map"] = {"": self.device}
        self.model: Any = AutoModelForCausalLM.from_pretrained(key.path, dtype=self.dtype, local_files_only=True,
                                                               trust_remote_code=key.trust_remote_code, **extra)
        if key.quantization == "none":
            self.model.to(self.device)
        self.model.eval()
        # transformers renamed the forward's KV cache argument (5.x: past_key_values → cache)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.tokenizer = AutoTokenizer.from_pretrained(key.path, local_files_only=True,
                                                       trust_remote_code=key.trust_remote_code)
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(i) for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.adapters: OrderedDict[str, str] = OrderedDict()   # folder → peft adapter name, least recently used first
        self.adapter_loads = self.adapter_evictions = 0
        self.last_used = time.monotonic()
        self.load_seconds = time.perf_counter() - started
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        log.info("inference: loaded base %s in %.1f s (%.2f GB of weights)", key.path, self.load_seconds,
                 self.weight_bytes / 1e9)

    # -- adapters --------------------------------------------------------------------------------------------
    def use_adapters(self, folders: set[str]) -> dict[str, str]:
        """Make these adapters loaded (loading the missing ones, evicting the least recently used others beyond
        ``max_adapters``) and return folder → peft name. Loaded ones cost nothing: switching is by name."""
        if len(folders) > self.max_adapters:
            raise RequestError("model", f"a batch needs {len(folders)} adapters; at most {self.max_adapters} load at once")
        for folder in folders:
            if folder in self.adapters:
                self.adapters.move_to_end(folder)
                continue
            self._load_adapter(folder)
            while len(self.adapters) > self.max_adapters:
                victim = next(f for f in self.adapters if f not in folders)
                name = self.adapters.pop(victim)
                self.model.set_adapter(self.adapters[folder])   # peft cannot delete the active adapter
                self.model.delete_adapter(name)
                self.adapter_evictions += 1
                log.info("inference: unloaded adapter %s (USF_MAX_LOADED_ADAPTERS=%d)", victim, self.max_adapters)
        return {f: self.adapters[f] for f in folders}

    def _load_adapter(self, folder: str) -> None:
        from peft import PeftModel

        if not (Path(folder) / "adapter_config.json").is_file():
            raise RequestError("model", "the adapter's files are missing")
        started = time.perf_counter()
        name = adapter_name(folder)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        self.model.eval()
        self.adapters[folder] = name
        self.adapter_loads += 1
        log.info("inference: loaded adapter %s in %.2f s", folder, time.perf_counter() - started)

    def forward_options(self, rows: list[str | None]) -> tuple[dict[str, Any], Any]:
        """(extra forward kwargs, context manager) for a batch whose rows use these adapter folders (None: base)."""
        from contextlib import nullcontext

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return {}, nullcontext()
        names = [self.adapters[f] if f else BASE_ADAPTER for f in rows]
        if len(set(names)) > 1:
            return {"adapter_names": names}, nullcontext()   # peft's mixed batch: each row its own adapter
        if names[0] == BASE_ADAPTER:
            return {}, self.model.disable_adapter()
        if self.model.active_adapter != names[0]:   # peft's set_adapter walks every module: only on a change
            self.model.set_adapter(names[0])
        return {}, nullcontext()

    def describe(self) -> dict[str, Any]:
        return describe_base(self)


def describe_base(base: Any) -> dict[str, Any]:
    """What /api/inference shows of a served base, either path's (``adapters``: its adapter folders)."""
    return {"path": base.key.path, "quantization": base.key.quantization, "device": str(base.device),
            "dtype": str(base.dtype).removeprefix("torch."), "load_seconds": round(base.load_seconds, 3),
            "weight_bytes": base.weight_bytes, "idle_seconds": round(time.monotonic() - base.last_used, 1),
            "adapters": list(base.adapters), "adapter_loads": base.adapter_loads,
            "adapter_evictions": base.adapter_evictions, "backend": base.backend}
