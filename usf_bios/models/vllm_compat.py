"""Whether an adapter folder loads in vLLM's LoRA loader (``vllm serve BASE --enable-lora --lora-modules NAME=PATH``),
checked from its files alone, without vLLM: the rules below are the ones vLLM's loader applies (its PEFT config
reader and its checkpoint reader, vLLM 0.6 – 0.11).

- ``adapter_config.json`` names a LoRA (``peft_type: LORA``) with ``r``, ``lora_alpha`` and ``target_modules``;
- no ``modules_to_save`` (vLLM loads only LoRA matrices), no DoRA, ``bias: none`` (an adapter bias needs a
  server started with bias support, which recent vLLM no longer has);
- the rank is one vLLM serves; above its default ``--max-lora-rank`` (16) the command must raise it;
- ``adapter_model.safetensors`` holds only ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` tensors
  (no adapter name inside the key), each on a module whose last name is one of the decoder's linear layers.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# --max-lora-rank takes one of these (vLLM's LoRAConfig); its default is 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
# the linear layers vLLM applies LoRA to in the decoder models this project trains (Llama, Qwen2/3, Mistral, Gemma,
# SmolLM): the names peft targets; vLLM maps q/k/v onto its packed qkv_proj and gate/up onto gate_up_proj itself
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class VllmCheck:
    problems: list[str] = field(default_factory=list)
    rank: int | None = None

    @property
    def compatible(self) -> bool:
        return not self.problems

    @property
    def max_lora_rank(self) -> int:
        """The smallest --max-lora-rank vLLM accepts that holds this adapter's rank."""
        rank = self.rank or VLLM_DEFAULT_MAX_RANK
        return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])

    def command(self, base: str, name: str, adapter: str, quantization: str = "none") -> str:
        """The ``vllm serve`` line that serves the base with this adapter as the model ``name`` (a QLoRA adapter on
        the base quantized in flight by bitsandbytes, as it was trained)."""
        parts = ["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={adapter}"]
        if self.max_lora_rank > VLLM_DEFAULT_MAX_RANK:
            parts += ["--max-lora-rank", str(self.max_lora_rank)]
        if quantization == "4bit":
            parts += ["--quantization", "bitsandbytes"]
        return shlex.join(parts)


def _config_problems(config: dict) -> list[str]:
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM loads LoRA adapters only")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if config.get(key) in (None, "", [])]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is set; vLLM loads only the LoRA matrices")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora: true) is not supported by vLLM")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; vLLM serves adapters with bias: none")
    rank = config.get("r")
    if isinstance(rank, int) and rank > VLLM_RANKS[-1]:
        problems.append(f"rank {rank} is above the largest rank vLLM serves ({VLLM_RANKS[-1]})")
    patterns = config.get("rank_pattern") or config.get("alpha_pattern")
    if patterns:
        problems.append("per-module ranks or alphas (rank_pattern / alpha_pattern) are not read by vLLM")
    return problems


def _tensor_problems(weights: Path) -> list[str]:
    from safetensors import safe_open

    unsupported: set[str] = set()
    malformed: list[str] = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            parts = key.split(".")
            if parts[:2] != ["base_model", "model"] or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
                malformed.append(key)
                continue
            module = parts[-3]
            if module not in VLLM_LORA_MODULES:
                unsupported.add(module)
    problems = []
    if malformed:
        problems.append(f"{len(malformed)} tensor(s) vLLM cannot place, e.g. {malformed[0]!r} (it reads only "
                        "base_model.model.<module>.lora_A.weight / lora_B.weight)")
    if unsupported:
        problems.append(f"LoRA on {', '.join(sorted(unsupported))}: vLLM applies LoRA only to "
                        f"{', '.join(sorted(VLLM_LORA_MODULES))}")
    return problems


def check_adapter(folder: Path) -> VllmCheck:
    """The problems vLLM's loader would raise on this adapter folder (none: it loads)."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return VllmCheck(problems=["no adapter_config.json in the folder"])
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        return VllmCheck(problems=[f"adapter_config.json does not parse: {exc}"])
    if not isinstance(config, dict):
        return VllmCheck(problems=["adapter_config.json is not an object"])
    problems = _config_problems(config)
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        problems += _tensor_problems(weights)
    else:
        problems.append("no adapter_model.safetensors (vLLM prefers it; this project always writes it)")
    rank = config.get("r") if isinstance(config.get("r"), int) else None
    return VllmCheck(problems=problems, rank=rank)
