"""What one benchmark run measured, and the throughput and MFU derived from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16


def mfu(tokens_per_second: float, n_params: int, peak: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: 4 FLOPs per parameter per trained token (forward 2, backward of the activations 2;
    the frozen base has no weight gradients), no attention term, recomputation not counted."""
    return 4 * n_params * tokens_per_second / peak


def summarize(step_seconds: list[float], step_tokens: list[int], warmup: int) -> float:
    """Tokens per second over the steps after the first ``warmup`` ones (sum of tokens / sum of seconds)."""
    if len(step_seconds) != len(step_tokens):
        raise ValueError(f"{len(step_seconds)} step times but {len(step_tokens)} token counts")
    seconds, tokens = step_seconds[warmup:], step_tokens[warmup:]
    if not seconds:
        raise ValueError(f"no timed step: {len(step_seconds)} steps ran and the first {warmup} are warm-up")
    if sum(seconds) <= 0:
        raise ValueError("the timed steps took no time")
    return sum(tokens) / sum(seconds)


@dataclass
class Measurement:
    tokens_per_second: float               # over the timed steps only
    peak_memory_gb: float                  # torch.cuda.max_memory_allocated / 1e9 (0 on the CPU)
    step_seconds: list[float] = field(default_factory=list)   # every step, warm-up included
    step_tokens: list[int] = field(default_factory=list)      # non-padding tokens of each step
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurement":
        return cls(tokens_per_second=float(data["tokens_per_second"]), peak_memory_gb=float(data["peak_memory_gb"]),
                   step_seconds=[float(s) for s in data.get("step_seconds", [])],
                   step_tokens=[int(t) for t in data.get("step_tokens", [])],
                   losses=[float(x) for x in data.get("losses", [])])
