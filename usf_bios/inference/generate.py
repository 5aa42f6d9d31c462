"""The decoding loop: a batch of requests on one base (each row with its own adapter, sampling and stop strings),
prefilled together (left-padded) and decoded one token a step; every row streams its text as it grows and leaves
the batch when it finishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from usf_bios.inference.detokenize import IncrementalText, decode
from usf_bios.inference.sampling import SamplingParams, choose_tokens, find_stop, safe_length

if TYPE_CHECKING:
    from usf_bios.inference.engine import Generation
    from usf_bios.inference.loaded import LoadedBase


@dataclass
class Row:
    """One request inside a batch."""

    gen: "Generation"
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    max_new: int
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0            # characters of the text already delivered
    finish: str | None = None
    decoded: IncrementalText | None = None   # the text of ``tokens`` as they grow (set by run_batch)


def _left_pad(rows: list[Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
        mask[i, width - len(row.prompt):] = 1
    return ids.to(device), mask.to(device)


def _advance(row: Row, token: int, base: "LoadedBase") -> None:
    """Add ``token`` to the row, deliver the text that is safe to send, and finish the row when it is done."""
    if token in base.eos_ids:
        row.finish = "stop"
    else:
        row.tokens.append(token)
    if row.finish or len(row.tokens) >= row.max_new or row.decoded is None:
        text = decode(base.tokenizer, row.tokens)   # the last text of a row: decoded whole, once
    else:
        text = row.decoded.text(row.tokens)
    cut = find_stop(text, row.params.stop)
    if cut is not None:
        text, row.finish = text[:cut], "stop"
    if row.finish is None and len(row.tokens) >= row.max_new:
        row.finish = "length"
    end = len(text) if row.finish else safe_length(text, row.params.stop)
    if end > row.sent:
        row.gen.deliver(("text", text[row.sent:end]))
        row.sent = end
    if row.finish:
        row.gen.deliver(("done", row.finish, len(row.tokens)))


@torch.inference_mode()
def run_batch(base: "LoadedBase", rows: list[Row]) -> None:
    """Decode ``rows`` to the end (each stops at an end-of-sequence token, a stop string, its ``max_new`` tokens,
    or when its client has gone)."""
    from transformers import DynamicCache

    device = base.device
    for row in rows:
        row.generator = row.params.generator(device)
        row.decoded = IncrementalText(base.tokenizer)
    ids, mask = _left_pad(rows, base.pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = mask.shape[1]   # the mask is made once with a column for every step; each step sees its first columns
    mask = torch.cat([mask, mask.new_ones((len(rows), max(r.max_new for r in rows)))], dim=1)
    cache = DynamicCache()
    active = list(rows)
    while active:
        extra, context = base.forward_options([r.adapter for r in active])
        with context:
            out = base.model(input_ids=ids, attention_mask=mask[:, :length], position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{base.cache_arg: cache}, **extra)
        chosen, next_ids = choose_tokens(out.logits[:, -1, :], [r.params for r in active],
                                         [r.generator for r in active])
        for row, token in zip(active, next_ids):
            if row.gen.cancelled:
                row.finish = "cancelled"
            else:
                _advance(row, token, base)
        keep = [i for i, row in enumerate(active) if row.finish is None]
        if not keep:
            return
        if len(keep) < len(active):   # finished rows leave the batch (and the cache)
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, chosen = mask[index], positions[index], chosen[index]
            active = [active[i] for i in keep]
        ids = chosen.unsqueeze(1)
        length += 1
        positions = positions[:, -1:] + 1
