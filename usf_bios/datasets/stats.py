"""Token-length statistics of a dataset under a model's tokenizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from usf_bios.datasets.formats import Example


@dataclass(frozen=True)
class TokenStats:
    rows: int
    min: int
    mean: float
    p95: int
    max: int
    truncated: int          # rows longer than max_seq_length
    max_seq_length: int


def token_lengths(examples: list[Example], tokenizer: Any) -> list[int]:
    """Each example's length as the engine tokenizes it (chat template included), before truncation."""
    from usf_bios.engine.data import encode_example

    return [len(encode_example(ex, tokenizer, 1 << 30, train_on_inputs=True).input_ids) for ex in examples]


def token_stats(examples: list[Example], tokenizer: Any, max_seq_length: int) -> TokenStats:
    return stats_from_lengths(token_lengths(examples, tokenizer), max_seq_length)


def stats_from_lengths(lengths: list[int], max_seq_length: int) -> TokenStats:
    lengths = sorted(lengths)
    if not lengths:
        raise ValueError("no examples")
    p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    return TokenStats(rows=len(lengths), min=lengths[0], mean=round(sum(lengths) / len(lengths), 1), p95=p95,
                      max=lengths[-1], truncated=sum(1 for n in lengths if n > max_seq_length),
                      max_seq_length=max_seq_length)
