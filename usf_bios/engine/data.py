"""From examples to token rows: chat template, loss mask, truncation, packing, batches.

Targets are shifted per example (``targets[t]`` is the token that position ``t`` predicts;
an example's last position predicts nothing), so packed examples never predict across
their boundary. Rows carry ``position_ids`` that restart at 0 for every example and the examples' boundaries
(``cu_seqlens``); the model is called without an attention mask, so either transformers builds a
block-diagonal causal mask from the positions (``attention: sdpa``) or the varlen attention uses the
boundaries (``attention: varlen``): packed examples never attend to each other.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from usf_bios.datasets.formats import Example, Message

IGNORE = -100


class TokenizationError(ValueError):
    """The tokenizer cannot render the dataset (for example: no chat template)."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    targets: list[int]     # shifted labels, IGNORE where no loss is taken
    truncated: bool
    line: int

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt)


_SENTINEL = "usf-bios-system-sentinel"


def template_system_prompt(tokenizer: Any) -> str | None:
    """The system message the chat template adds to a conversation that has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM, …"): the template rendered with a marked system message and without one, the
    text that stands where the mark stood. None when the template adds none (or cannot take a system message).
    Training renders the same template, so such a prompt is in every example's tokens."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "hello"}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": _SENTINEL}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise their own errors on roles they refuse
        return None
    head, found, tail = marked.partition(_SENTINEL)
    if not found or len(bare) < len(head) + len(tail) or not bare.startswith(head) or not bare.endswith(tail):
        return None
    return bare[len(head):len(bare) - len(tail)].strip() or None


def assistant_spans(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (end-of-turn included).

    A turn whose rendering is not a prefix of the whole (templates that rewrite earlier turns)
    is left out of the loss; if no turn can be placed, that is an error.
    """
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
    if not spans:
        raise TokenizationError("the chat template rewrites earlier turns, so assistant tokens cannot be located; "
                                "set train_on_inputs: true to train on the whole conversation")
    return full, spans


def _tokenize_with_mask(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it lies inside one of ``spans``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded["offset_mapping"]]
    return ids, mask


def encode_example(example: Example, tokenizer: Any, max_seq_length: int, train_on_inputs: bool) -> TokenizedExample:
    """Tokenize one example and mark which tokens carry loss."""
    if example.templated:
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizationError("the tokenizer has no chat template, which chat formats (messages, sharegpt, "
                                    "alpaca) need; use a model with a chat template, or the prompt_completion or text format")
        if train_on_inputs:
            text, spans = _render(tokenizer, example.messages), [(0, 1 << 62)]
        else:
            text, spans = assistant_spans(tokenizer, example.messages)
        ids, trained = _tokenize_with_mask(tokenizer, text, spans)
    else:
        *prompt_parts, answer = example.messages
        prompt_ids: list[int] = tokenizer("".join(m.content for m in prompt_parts))["input_ids"] if prompt_parts else []
        answer_ids: list[int] = tokenizer(answer.content, add_special_tokens=not prompt_parts)["input_ids"]
        eos = tokenizer.eos_token_id
        if eos is not None and (not answer_ids or answer_ids[-1] != eos):
            answer_ids = answer_ids + [eos]
        ids = prompt_ids + answer_ids
        trained = [train_on_inputs] * len(prompt_ids) + [True] * len(answer_ids)
    truncated = len(ids) > max_seq_length
    ids, trained = ids[:max_seq_length], trained[:max_seq_length]
    targets = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return TokenizedExample(ids, targets, truncated, example.line)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most ``capacity`` tokens.

    Deterministic: ties keep the input order. Returns rows in order of creation.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for index in order:
        need = lengths[index]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([index])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor      # (rows, length)
    position_ids: torch.Tensor   # restarts at 0 for each example (and for the padding tail)
    targets: torch.Tensor        # IGNORE on padding and untrained tokens
    real_tokens: int             # non-padding tokens
    cu_seqlens: torch.Tensor     # int32 boundaries of the examples (and padding tails) in the flattened rows
    max_seqlen: int              # the longest of those segments
    trained_index: torch.Tensor  # flat positions whose target is trained
    rows: int = 0                # packed rows this batch holds (more than its height when they were merged)

    @property
    def trained_tokens(self) -> int:
        return int(self.trained_index.numel())

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device``; to a GPU through pinned memory, so the copies queue behind the running kernels
        instead of waiting for them."""
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if cuda and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=cuda)

        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), self.real_tokens,
                     move(self.cu_seqlens), self.max_seqlen, move(self.trained_index), self.rows)


def collate(rows: Sequence[Sequence[TokenizedExample]], pad_id: int, *, as_one_row: bool = False) -> Batch:
    """Concatenate each row's examples and pad rows to the longest one; ``as_one_row`` concatenates all the rows
    into one (no padding at all: for variable-length attention, which keeps the examples apart anyway)."""
    count = len(rows)
    if as_one_row:
        rows = [[ex for row in rows for ex in row]]
    flat = [([t for ex in row for t in ex.input_ids], [p for ex in row for p in range(len(ex.input_ids))],
             [t for ex in row for t in ex.targets]) for row in rows]
    width = max(len(ids) for ids, _, _ in flat)
    input_ids, positions, targets, segments = [], [], [], []
    for row, (ids, pos, tgt) in zip(rows, flat):
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        positions.append(pos + list(range(pad)))
        targets.append(tgt + [IGNORE] * pad)
        segments += [len(ex.input_ids) for ex in row if ex.input_ids] + ([pad] if pad else [])
    target_tensor = torch.tensor(targets)
    return Batch(torch.tensor(input_ids), torch.tensor(positions), target_tensor,
                 real_tokens=sum(len(ids) for ids, _, _ in flat),
                 cu_seqlens=torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32),
                 max_seqlen=max(segments),
                 trained_index=torch.nonzero(target_tensor.flatten() != IGNORE).flatten(), rows=count)


def split_indices(count: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """(validation, training) example indices: a permutation seeded by ``seed``, its first share for validation."""
    shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = math.floor(count * val_split) if count > 1 else 0
    return shuffled[:n_val], shuffled[n_val:]


def weighted_take(count: int, weight: float, seed: int) -> list[int]:
    """Indices ``0 .. count-1`` sampled at ``weight``: each ``floor(weight)`` times, then a share ``weight -
    floor(weight)`` of them picked by a permutation seeded by ``seed`` (in index order): 2.5 × 10 gives 25."""
    whole = math.floor(weight)
    taken = list(range(count)) * whole
    extra = round((weight - whole) * count)
    if extra:
        taken += sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()[:extra])
    return taken


def weigh_training(train: list[int], sources: Sequence[int], weights: Sequence[float], seed: int) -> list[int]:
    """The training indices of a dataset mixture, each dataset's sampled at its weight (``sources[i]``: the
    dataset of example ``i``). Validation examples are never repeated, so no copy of one lands in training."""
    out: list[int] = []
    for dataset, weight in enumerate(weights):
        members = [i for i in train if sources[i] == dataset]
        out += [members[j] for j in weighted_take(len(members), weight, seed * 7919 + dataset)]
    return out


class TrainingData:
    """Train/validation rows and the deterministic order of micro-batches in each epoch. With ``sources`` and
    ``weights`` (a dataset mixture) each dataset's training examples are sampled at its weight."""

    def __init__(self, examples: list[TokenizedExample], *, batch_size: int, max_seq_length: int,
                 packing: bool, val_split: float, seed: int, pad_id: int,
                 sources: Sequence[int] | None = None, weights: Sequence[float] | None = None):
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        val, train = split_indices(len(examples), val_split, seed)
        if weights is not None:
            assert sources is not None and len(sources) == len(examples)
            train = weigh_training(train, sources, weights, seed)
        self.val_examples, self.train_examples = [examples[i] for i in val], [examples[i] for i in train]
        self._order: tuple[int, list[int]] = (-1, [])
        self.train_rows = self._rows(self.train_examples, packing, max_seq_length)
        self.val_rows = self._rows(self.val_examples, packing, max_seq_length)

    @staticmethod
    def _rows(examples: list[TokenizedExample], packing: bool, capacity: int) -> list[list[TokenizedExample]]:
        if not packing:
            return [[ex] for ex in examples]
        return [[examples[i] for i in row] for row in pack_rows([len(ex.input_ids) for ex in examples], capacity)]

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_rows) / self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Row order of an epoch: a permutation seeded by (seed, epoch), the same in every process."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_rows), generator=generator).tolist())
        return self._order[1]

    def micro_batch(self, order: list[int], index: int) -> Batch:
        picked = order[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.train_rows[i] for i in picked], self.pad_id)

    def merged_batches(self, order: list[int], first: int, count: int, tokens_per_pass: int) -> list[Batch]:
        """Micro-batches ``first`` .. ``first + count - 1`` as few one-row batches of at most ``tokens_per_pass``
        tokens (a row longer than that goes alone): the same rows in the same order, fewer passes."""
        picked = order[first * self.batch_size:(first + count) * self.batch_size]
        groups: list[list[list[TokenizedExample]]] = []
        filled = 0
        for row in (self.train_rows[i] for i in picked):
            tokens = sum(len(ex.input_ids) for ex in row)
            if not groups or filled + tokens > tokens_per_pass:
                groups.append([])
                filled = 0
            groups[-1].append(row)
            filled += tokens
        return [collate(group, self.pad_id, as_one_row=True) for group in groups]

    def validation_batches(self) -> list[Batch]:
        rows = self.val_rows
        return [collate(rows[i:i + self.batch_size], self.pad_id) for i in range(0, len(rows), self.batch_size)]
