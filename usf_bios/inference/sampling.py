"""Sampling parameters of one request, and the choice of its next token from the model's logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 4


class RequestError(ValueError):
    """A request the engine cannot serve as asked: ``field`` names what is at fault (``max_tokens``, ``messages``)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. ``temperature`` 0 is greedy; ``seed`` makes sampling repeatable (each request has
    its own generator, so the tokens do not depend on what else runs in its batch); ``max_tokens`` None is as many
    as the model's context leaves, at most ``DEFAULT_MAX_TOKENS``."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise RequestError("temperature", "must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p", "must be > 0 and ≤ 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError("max_tokens", "must be ≥ 1")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise RequestError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> tuple[torch.Tensor, list[int]]:
    """The next token of every row of ``logits`` (rows, vocabulary), on the device (rows,) and as a list: one
    argmax for all the rows and one copy to the host (a single device sync a step); the rows that sample draw with
    their own generator, one by one, so a seeded row draws what it would alone."""
    chosen = torch.argmax(logits, dim=-1)
    for i, (row_params, generator) in enumerate(zip(params, generators)):
        if row_params.temperature != 0:
            chosen[i:i + 1] = sample_token(logits[i], row_params, generator)
    return chosen, chosen.tolist()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """A draw (a tensor of one token) from one row of logits (vocabulary,): the temperature-scaled distribution cut
    to the smallest set of tokens whose probability reaches ``top_p``."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p   # the first always stays
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return order[pick]
    return torch.multinomial(probs, 1, generator=generator)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent without a stop string being cut in half (its start held back) or an
    incomplete UTF-8 character (the tokenizer's replacement character at the end)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return end
