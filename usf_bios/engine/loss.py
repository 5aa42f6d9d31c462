"""The training loss: summed cross-entropy over the trained positions of a batch, three ways.

- ``full``: the model's own head makes logits for every position, then cross-entropy (the reference path).
- ``chunked``: the decoder's hidden states at the trained positions only go through the output layer a slice at a
  time; each slice's logits, softmax and gradient exist only inside the loop, so the logits never exist whole
  (for a 128k vocabulary, 16k tokens of fp32 logits would be 8 GiB). The gradient for the hidden states is made
  in the forward pass, so the backward pass recomputes nothing.
- ``fused``: the same idea with Liger's fused linear cross-entropy kernel (CUDA, ``liger-kernel``).

All three return the same sum (to rounding) and the same gradients; tests/engine/test_speed.py checks it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from usf_bios.engine.data import IGNORE, Batch

CHUNK_ELEMENTS = 2**26  # fp32 logits per slice: 256 MiB


def model_kwargs(batch: Batch, attention: str) -> dict[str, Any]:
    """Keyword arguments for the model call; ``varlen`` attention reads the example boundaries from them."""
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if attention == "varlen":
        kwargs.update(usf_cu_seqlens=batch.cu_seqlens, usf_max_seqlen=batch.max_seqlen)
    return kwargs


def output_parts(model: Any) -> tuple[Any, torch.nn.Module]:
    """(decoder, output layer) of a peft-wrapped or plain causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def head_is_plain(model: Any) -> str | None:
    """Why the output layer cannot be sliced (None when it can): a trained, wrapped or rescaled head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output layer is a {type(head).__name__}, not a plain Linear"
    if head.weight.requires_grad:
        return "the output layer is trained"
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"the model rescales its logits ({name})"
    return None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) without whole logits; the head itself is frozen."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part = hidden[start:start + rows].to(weight.dtype)
            target = targets[start:start + rows]
            logits = F.linear(part, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if want_grad:
                logits.sub_(lse[:, None]).exp_()                                    # softmax, in place
                logits.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))
                grad_hidden[start:start + rows] = (logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if want_grad else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None), None, None, None


def _trained_hidden(model: Any, batch: Batch, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    decoder, _ = output_parts(model)
    kwargs = model_kwargs(batch, attention)
    hidden = decoder(**kwargs).last_hidden_state
    index = batch.trained_index
    return hidden.flatten(0, 1).index_select(0, index), batch.targets.flatten().index_select(0, index)


def token_losses(model: Any, batch: Batch) -> torch.Tensor:
    """Per-position cross-entropy through full logits (0 where the target is ignored), shape (rows, length)."""
    logits = model(**model_kwargs(batch, "sdpa")).logits
    losses = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none")
    return losses.view_as(batch.targets)


def loss_sum(model: Any, batch: Batch, *, loss: str = "full", attention: str = "sdpa") -> torch.Tensor:
    """Summed cross-entropy over the batch's trained positions (a 0-d fp32 tensor)."""
    if loss == "full":
        logits = model(**model_kwargs(batch, attention)).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                               reduction="sum")
    hidden, targets = _trained_hidden(model, batch, attention)
    _, head = output_parts(model)
    if loss == "chunked" or not torch.is_grad_enabled():
        return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets)
    if loss == "fused":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden.to(head.weight.dtype), head.weight, targets, bias=head.bias,
                                                ignore_index=IGNORE, reduction="sum").float()
    raise ValueError(f"unknown loss path {loss!r}")
