"""Attention over packed examples: one variable-length call, no mask.

With ``attention: varlen`` the packed examples of a row go through one variable-length attention call — the
flash kernel of ``torch.nn.attention.varlen`` on CUDA, one causal SDPA per example on the CPU — with the example
boundaries (``cu_seqlens``) computed on the host, instead of SDPA with a dense block-diagonal mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "usf_varlen"


@dataclass(frozen=True)
class _VarlenCall:
    """How this torch's ``varlen_attn`` is called, worked out once (its keywords changed between releases)."""

    kernel: Callable[..., torch.Tensor]
    causal: tuple[tuple[str, Any], ...]   # ("is_causal", True) or ("window_size", (-1, 0))
    takes_scale: bool
    takes_gqa_flag: bool                  # has ``enable_gqa``; without it, fewer K/V heads may work as they are


@lru_cache(maxsize=1)
def _varlen_call() -> _VarlenCall | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = (("is_causal", True),) if "is_causal" in params else (("window_size", (-1, 0)),)
    return _VarlenCall(varlen_attn, causal, "scale" in params, "enable_gqa" in params)


_native_gqa: dict[str, bool] = {}   # "ok": whether the kernel took fewer K/V heads than query heads (learned once)


def _flash_varlen(call: _VarlenCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, scaling: float | None) -> torch.Tensor:
    """The flash kernel over packed examples. Grouped K/V heads go in as they are (the kernel shares each among its
    query heads); only a kernel that refuses them gets them repeated to the query's head count."""
    kwargs: dict[str, Any] = dict(call.causal)
    if scaling is not None and call.takes_scale:
        kwargs["scale"] = scaling
    heads = q.shape[1]
    if k.shape[1] != heads and call.takes_gqa_flag:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != heads:
        if _native_gqa.get("ok") is not False:
            try:
                out = call.kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
                _native_gqa["ok"] = True
                return out
            except torch.OutOfMemoryError:  # says nothing about the heads
                raise
            except (RuntimeError, ValueError):
                if _native_gqa.get("ok"):
                    raise
                _native_gqa["ok"] = False
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    return call.kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _per_example_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           scaling: float | None) -> torch.Tensor:
    """The CPU path: one causal SDPA per example. q: (tokens, heads, dim); k, v: (tokens, kv_heads, dim)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    cu_seqlens, max_seqlen = kwargs.get("usf_cu_seqlens"), kwargs.get("usf_max_seqlen")
    if cu_seqlens is None:  # a call without boundaries (generation, a plain forward): ordinary causal SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=True)
    if dropout:
        raise ValueError("varlen attention does not apply attention dropout; use performance.attention: sdpa")
    batch, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    call = _varlen_call() if q.is_cuda else None
    if call is None:
        out = _per_example_attention(q, k, v, cu_seqlens, scaling)
    else:
        out = _flash_varlen(call, q, k, v, cu_seqlens, max_seqlen, scaling)
    return out.view(batch, length, heads, dim), None


def use_varlen_attention(model: Any) -> None:
    """Route the model's attention through ``varlen_attention`` (no mask is built for it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    model.config._attn_implementation = VARLEN_ATTENTION
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = VARLEN_ATTENTION

