"""Synthetic token data with the length spread of real SFT sets: many short examples, a long tail, a few at the limit."""

from __future__ import annotations

import math
import random

import torch

from usf_bios.engine.data import IGNORE, TokenizedExample

SIGMA = 1.0  # log-normal spread: with the median at max_len/6, about 4% of examples reach max_len


def example_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """``n`` lengths from a log-normal with median about ``max_len / 6``, clipped to [min(32, max_len), max_len]."""
    if n < 0 or max_len < 1:
        raise ValueError(f"need n >= 0 and max_len >= 1 (got n={n}, max_len={max_len})")
    rng = random.Random(seed)
    mu, low = math.log(max_len / 6), min(32, max_len)
    return [min(max_len, max(low, round(rng.lognormvariate(mu, SIGMA)))) for _ in range(n)]


def workload_examples(workload: str, n: int, max_len: int, vocab_size: int, seed: int) -> list[TokenizedExample]:
    """``packed``: ``synthetic_examples``; ``full-rows``: ``n`` examples of exactly ``max_len`` random tokens."""
    if workload == "packed":
        return synthetic_examples(n, max_len, vocab_size, seed)
    if workload != "full-rows":
        raise ValueError(f"unknown workload {workload!r}: packed or full-rows")
    return synthetic_examples(n, max_len, vocab_size, seed, lengths=[max_len] * n)


def synthetic_examples(n: int, max_len: int, vocab_size: int, seed: int, *,
                       lengths: list[int] | None = None) -> list[TokenizedExample]:
    """``n`` examples of random token ids in [0, vocab_size), every position trained (text continuation).

    ``targets[t] = input_ids[t + 1]`` and the last position predicts nothing, as ``encode_example`` builds them.
    """
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i, length in enumerate(lengths if lengths is not None else example_lengths(n, max_len, seed)):
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, ids[1:] + [IGNORE], truncated=False, line=i + 1))
    return examples
