"""Speed switches: how the engine computes, never what it learns.

Each switch in ``spec.performance`` has a plain path and a faster one; 'auto' picks the faster one where this
machine supports it. The choice is resolved once into a ``SpeedPlan`` (logged by the engine) and applied to the
model here:

- attention ``varlen``: packed examples go through one variable-length attention call (the flash kernel of
  ``torch.nn.attention.varlen`` on CUDA, one causal SDPA per example on the CPU) with the example boundaries
  computed on the host, instead of SDPA with a dense block-diagonal mask.
- checkpointing ``auto``: recompute only as many decoder layers as GPU memory needs (none when it fits);
  ``offload``: every layer, with the saved inputs that do not fit on the GPU kept in pinned host memory, and
  (without LoRA dropout) the MLP recomputed in slices over long sequences, for the longest contexts.
- merge micro-batches: with varlen attention the packed rows of one optimizer step run through the model in as
  few passes as free GPU memory holds without recomputation (one row each, no padding); the loss is normalised
  by the step's trained tokens, so the gradient is the same sum.
- compile: ``torch.compile`` of each decoder layer (off unless asked; without Liger's kernels, which fail inside
  compiled layers on a GPU; measured 5% slower than eager on Llama-3.1-8B, docs/benchmarks.md).
- fused kernels: Liger's RMSNorm, RoPE and SwiGLU kernels; fused LoRA: see ``engine/fused_lora.py``; fused
  optimizer: ``torch.optim.AdamW(fused=True)``.
- loss: see ``engine/loss.py``; auto is Liger's fused loss where it is installed on a GPU, except for offload.
- allocator: a training process asks PyTorch for expandable segments (``prefer_expandable_segments``) unless the
  user configured the allocator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from usf_bios.engine.model import Placement
from usf_bios.spec import Hyperparameters, JobSpec, Performance

VARLEN_ATTENTION = "usf_varlen"
MLP_SLICE_TOKENS = 16_384         # the MLP runs in slices of this many tokens when a micro-batch is longer
HEADROOM_BYTES = 3 * 2**30        # kept free for the loss slices, the optimizer and the allocator's slack


ALLOCATOR_SETTING = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def prefer_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Call before this process first touches CUDA: PyTorch's allocator then grows its segments in place
    (``expandable_segments``) instead of reserving fixed ones. Packed micro-batches of varying length, and a long
    context's multi-GB tensors, fragment fixed segments: a freed 20 GB block split for smaller tensors can no longer
    take the next 20 GB one, and the step runs out of memory with gigabytes reserved but unused. A setting the user
    made (either variable) is left as it is. Returns whether the setting was made here."""
    if any(name in environ for name in ALLOCATOR_VARIABLES):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING
    return True


def expandable_segments_active(device: torch.device) -> bool:
    """Whether the CUDA allocator on ``device`` has handed out expandable segments (read from its snapshot, so
    it reports what the allocator did, not what was asked)."""
    segments = torch.cuda.memory_snapshot()
    return any(s.get("is_expandable", False) for s in segments if s.get("device") == device.index)


class SpeedPlanError(ValueError):
    """A switch was turned on that this machine cannot honour (for example a CUDA kernel on the CPU)."""


@dataclass(frozen=True)
class SpeedPlan:
    attention: str              # sdpa | varlen
    loss: str                   # full | chunked | fused
    fused_kernels: bool
    fused_optimizer: bool
    checkpointing: str          # none | auto | all | offload (auto becomes a layer count in apply_checkpointing)
    fused_lora: bool = False
    merge_micro_batches: bool = False
    compile: bool = False
    tokens_per_pass: int = 0    # set by build_model when merging: the most tokens one forward/backward pass takes

    def describe(self) -> str:
        merge = f"merged micro-batches up to {self.tokens_per_pass:,} tokens a pass" if self.tokens_per_pass \
            else "micro-batches as configured"
        return (f"attention {self.attention}, loss {self.loss}, fused kernels {'on' if self.fused_kernels else 'off'}, "
                f"fused LoRA {'on' if self.fused_lora else 'off'}, "
                f"fused AdamW {'on' if self.fused_optimizer else 'off'}, checkpointing {self.checkpointing}, {merge}"
                + (", compiled layers" if self.compile else ""))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _switch(value: str, available: bool, field: str, why: str) -> bool:
    if value == "on" and not available:
        raise SpeedPlanError(f"performance.{field}: {why}")
    return value == "on" or (value == "auto" and available)


def _fused_kernels(perf: Performance, liger: bool, liger_why: str) -> bool:
    """Liger's kernels, except under ``compile``: on a GPU the compiled layers' backward pass received gradients of
    the wrong rank through them (docs/benchmarks.md), so ``auto`` leaves them out and ``on`` is refused."""
    if perf.compile == "on" and liger and perf.fused_kernels != "off":
        if perf.fused_kernels == "on":
            raise SpeedPlanError("performance.fused_kernels: Liger's kernels do not work inside compiled layers; "
                                 "set fused_kernels to auto or off with compile on")
        return False
    return _switch(perf.fused_kernels, liger, "fused_kernels", liger_why)


def auto_loss(perf: Performance, hp: Hyperparameters, liger: bool) -> str:
    """What ``loss: auto`` becomes (``liger``: liger-kernel on a CUDA GPU). Liger's loss measured faster
    (docs/benchmarks.md), but its slices grow with the pass (1/32 of its tokens at Llama's vocabulary) where the
    chunked loss's stay at 256 MiB, so the long-context plan (offload) keeps the chunked one."""
    offload = hp.gradient_checkpointing and perf.checkpointing == "offload"
    return "fused" if liger and not offload else "chunked"


def resolve_plan(perf: Performance, hp: Hyperparameters, placement: Placement) -> SpeedPlan:
    """The concrete choices for this job on this machine; errors name the field that cannot be honoured."""
    cuda = placement.device.type == "cuda"
    liger = cuda and _has("liger_kernel")
    liger_why = "needs a CUDA GPU and the liger-kernel package (pip install 'usf-bios[gpu]')"
    attention = perf.attention
    if attention == "auto":
        attention = "varlen" if cuda and hp.packing else "sdpa"
    loss = perf.loss
    if loss == "fused" and not liger:
        raise SpeedPlanError(f"performance.loss: fused {liger_why}")
    if not hp.gradient_checkpointing:
        checkpointing = "none"
    elif perf.checkpointing == "auto":  # a quantized model asks for the least memory: recompute every layer
        checkpointing = "auto" if cuda and hp.quantization == "none" else "all"
    else:
        checkpointing = perf.checkpointing
    if loss == "auto":
        loss = auto_loss(perf, hp, liger)
    mergeable = cuda and attention == "varlen" and hp.packing and checkpointing in ("auto", "none")
    merge = _switch(perf.merge_micro_batches, mergeable, "merge_micro_batches",
                    "needs a CUDA GPU, packing, varlen attention and checkpointing auto (or gradient checkpointing off)")
    return SpeedPlan(
        merge_micro_batches=merge, compile=perf.compile == "on",
        attention=attention, loss=loss,
        fused_kernels=_fused_kernels(perf, liger, liger_why),
        fused_optimizer=_switch(perf.fused_optimizer, cuda, "fused_optimizer", "the fused AdamW needs a CUDA GPU"),
        checkpointing=checkpointing, fused_lora=perf.fused_lora != "off")


# --- attention ------------------------------------------------------------------------------------------------


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


# --- fused kernels ----------------------------------------------------------------------------------------------


def apply_fused_kernels(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU in place of the model's own (the loss is chosen separately)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SpeedPlanError(f"performance.fused_kernels: Liger has no kernels for {model_type} models")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


# --- activation checkpointing ------------------------------------------------------------------------------------


def activation_bytes_per_token(config: Any, lora_dropout: float, dtype_bytes: int = 2, fused_lora: bool = False) -> int:
    """What one decoder layer keeps for the backward pass per token when it is not recomputed (an upper estimate).

    Norm inputs and fp32 statistics, q/k/v after RoPE, the attention output, the MLP's gate, up, activation and
    product, and, with LoRA dropout, the dropped copies of the LoRA inputs; 25% slack for what the sum misses.
    With fused LoRA layers (and no dropout) the layer inputs are kept once, not again as peft's copies: three
    hidden-sized tensors and one intermediate-sized one fewer (measured on Llama-3.1-8B: 159 KiB per token and
    layer against 192 without, docs/benchmarks.md).

    It is also the working set of one layer under ``checkpointing: offload``. A finer count there (the MLP one
    16k-token slice at a time) kept 16 of 32 Llama-3.1-8B layer inputs on an 85.5 GB card at 352,256 tokens and ran
    out of memory (docs/benchmarks.md), so long contexts plan with the whole layer.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    elements = 8 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * inter
    if fused_lora and not lora_dropout:
        elements -= 3 * hidden + inter
    if lora_dropout:
        elements += 4 * hidden + inter
    return math.ceil(1.25 * elements * dtype_bytes)


def layers_to_recompute(num_layers: int, tokens: int, per_token_bytes: int, layer_input_bytes: int,
                        free_bytes: int) -> int:
    """The fewest decoder layers to recompute so that the saved activations fit in ``free_bytes``."""
    budget = free_bytes - HEADROOM_BYTES
    keep_all = num_layers * tokens * per_token_bytes
    if keep_all <= budget:
        return 0
    saving = tokens * (per_token_bytes - layer_input_bytes)
    return min(num_layers, math.ceil((keep_all - budget) / max(saving, 1)))


def free_gpu_bytes(model: Any) -> int:
    """GPU memory this process can still use on the model's device: free on the card plus cached but unused."""
    device = next(p for p in model.parameters()).device
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def tokens_per_pass(num_layers: int, per_token_bytes: int, free_bytes: int, micro_batch_tokens: int,
                    step_tokens: int) -> int:
    """How many tokens one merged pass may take: as many as keep every layer's activations within ``free_bytes``
    (less the headroom), at most a whole step's; 0 when that is no more than one configured micro-batch."""
    fit = max(free_bytes - HEADROOM_BYTES, 0) // max(num_layers * per_token_bytes, 1)
    tokens = min(step_tokens, fit)
    return tokens if tokens > micro_batch_tokens else 0


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


OFFLOAD_PIECE_BYTES = 2**28   # host copies in pieces of this size: PyTorch's pinned-memory cache rounds each
                              # allocation up to a power of two (a 2.9 GB layer input would take 4 GiB)


class HostCopy:
    """A tensor copied to (pinned, from a GPU) host memory in pieces of ``OFFLOAD_PIECE_BYTES``: every piece but the
    last is a power of two, so the pinned-memory cache wastes at most part of one piece per tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype = tensor.shape, tensor.dtype
        flat = tensor.detach().reshape(-1)
        per_piece = max(OFFLOAD_PIECE_BYTES // flat.element_size(), 1)
        self.pieces = []
        for start in range(0, flat.numel(), per_piece):
            part = flat[start:start + per_piece]
            piece = torch.empty(part.shape, dtype=part.dtype, device="cpu", pin_memory=tensor.is_cuda)
            piece.copy_(part, non_blocking=True)
            self.pieces.append(piece)

    def to(self, device: torch.device) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        flat, start = out.view(-1), 0
        for piece in self.pieces:
            flat[start:start + piece.numel()].copy_(piece, non_blocking=True)
            start += piece.numel()
        return out


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without keeping its activations; its input waits for the backward pass in pinned host memory
    (``to_host``) or where it is."""

    @staticmethod
    def forward(ctx: Any, function: Callable[..., Any], to_host: bool, hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
        ctx.function, ctx.rest, ctx.device = function, rest, hidden.device
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        if to_host:
            ctx.saved = HostCopy(hidden)
        else:  # kept where it is; saved the checked way, so an in-place change before the backward pass is an error
            ctx.saved = None
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            out = function(hidden, *rest)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        kept = ctx.saved.to(ctx.device) if ctx.saved is not None else ctx.saved_tensors[0]
        hidden = kept.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.function(hidden, *ctx.rest)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, grad)
        ctx.saved = None
        return (None, None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(function: Callable[..., Any], hidden: torch.Tensor, *rest: Any,
                         to_host: bool = True) -> torch.Tensor:
    """A drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it for a decoder layer."""
    return _OffloadedLayer.apply(function, to_host, hidden, *rest)


def layers_to_offload(num_layers: int, working_bytes: int, layer_input_bytes: int, free_bytes: int) -> int:
    """How many layers' saved inputs (``layer_input_bytes`` each) must go to host memory: those that do not fit on
    the GPU beside the working set of the layer being recomputed (tokens × ``activation_bytes_per_token``) and the
    headroom."""
    room = free_bytes - HEADROOM_BYTES - working_bytes
    on_gpu = max(0, min(num_layers, room // max(layer_input_bytes, 1)))
    return num_layers - on_gpu


def _offload_count(model: Any, layers: int, working_bytes: int, layer_input_bytes: int) -> int:
    """Every layer on the CPU; on CUDA only what does not fit (see ``layers_to_offload``), refused when that much
    would not fit in host memory either (``check_host_memory``)."""
    if next(p for p in model.parameters()).device.type != "cuda":
        return layers
    offloaded = layers_to_offload(layers, working_bytes, layer_input_bytes, free_gpu_bytes(model))
    check_host_memory(offloaded * layer_input_bytes, available_host_bytes())
    return offloaded


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(needed: int, available: int | None) -> None:
    """Refuse an offload plan whose layer inputs at the longest micro-batch would not fit in host memory (a job
    that would otherwise die at its first long batch, hours in)."""
    if available is not None and needed > 0.9 * available:
        raise SpeedPlanError(
            f"performance.checkpointing: offload would keep up to {needed / 1e9:.1f} GB of layer inputs in host "
            f"memory at the longest micro-batch, and this machine has {available / 1e9:.1f} GB available; lower "
            "hyperparameters.max_seq_length or batch_size, or use a GPU with more memory")


def _sliced_mlp(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    if tokens <= MLP_SLICE_TOKENS or not torch.is_grad_enabled():
        return forward(x)
    flat = x.reshape(-1, x.shape[-1])
    parts = [torch.utils.checkpoint.checkpoint(forward, flat[i:i + MLP_SLICE_TOKENS], use_reentrant=False)
             for i in range(0, flat.shape[0], MLP_SLICE_TOKENS)]
    return torch.cat(parts).view(*x.shape[:-1], -1)


def apply_checkpointing(model: Any, plan: SpeedPlan, tokens_per_micro_batch: int, per_token: int,
                        lora_dropout: float, dtype_bytes: int) -> tuple[int, int, int]:
    """Set which decoder layers recompute their activations and, with ``offload``, which keep their saved input
    in host memory (``per_token``: ``activation_bytes_per_token``); returns (layers recomputed, layers offloaded,
    their inputs' bytes at the longest micro-batch)."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    if plan.checkpointing == "none" or not layers:
        for layer in layers:
            layer.gradient_checkpointing = False
        return 0, 0, 0
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    functions: list[Callable[..., Any]] = [partial(checkpoint, use_reentrant=False)] * len(layers)
    recompute, offloaded = len(layers), 0
    input_bytes = tokens_per_micro_batch * text.hidden_size * dtype_bytes
    if plan.checkpointing == "offload":
        # the first layers' inputs go to the host; the last ones, whose backward comes first, stay on the GPU
        offloaded = _offload_count(model, len(layers), tokens_per_micro_batch * per_token, input_bytes)
        functions = [partial(offloaded_checkpoint, to_host=index < offloaded) for index in range(len(layers))]
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and not lora_dropout:  # slices would draw other dropout masks than the whole
                mlp.forward = partial(_sliced_mlp, mlp.forward)
    elif plan.checkpointing == "auto":
        recompute = layers_to_recompute(len(layers), tokens_per_micro_batch, per_token,
                                        text.hidden_size * dtype_bytes, free_gpu_bytes(model))
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = functions[index]
        layer.gradient_checkpointing = index < recompute
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan.checkpointing != "offload" and hasattr(inner, "disable_input_require_grads"):
        # transformers makes the embeddings' output require a gradient for reentrant checkpointing; the
        # non-reentrant kind needs none, and the backward pass would compute one through the first layer for nothing.
        # The offloaded layer is an autograd function and does need it.
        with contextlib.suppress(AttributeError):  # no hook was registered
            inner.disable_input_require_grads()
    return recompute, offloaded, offloaded * input_bytes


# --- compilation -------------------------------------------------------------------------------------------------


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation: the layers share their code, and with
    parameters passed as graph inputs one compiled graph serves them all). Inside the checkpointing wrapper, so a
    recomputed layer runs the compiled code too. Returns how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=None)  # the token count changes between micro-batches: dynamic after the first change
    return len(layers)


# --- all together ------------------------------------------------------------------------------------------------


def build_model(base: Any, spec: JobSpec, plan: SpeedPlan, placement: Placement) -> tuple[Any, SpeedPlan, list[str]]:
    """Fused kernels and attention on the base model, LoRA, then checkpointing; returns the model, the plan as
    applied (a head that cannot be sliced turns the loss back to ``full``) and lines for the job log."""
    from usf_bios.engine.fused_lora import fuse_lora_layers
    from usf_bios.engine.loss import head_is_plain
    from usf_bios.engine.model import apply_lora

    hp = spec.hyperparameters
    if plan.fused_kernels:
        apply_fused_kernels(base)
    if plan.attention == "varlen":
        use_varlen_attention(base)
    model = apply_lora(base, spec)
    if plan.fused_lora:
        fuse_lora_layers(model)
    notes = []
    if plan.loss != "full" and (why := head_is_plain(model)):
        notes.append(f"loss: full logits, because {why}")
        plan = replace(plan, loss="full")
    dtype_bytes = 4 if placement.precision == "fp32" and hp.quantization == "none" else 2
    pass_tokens = hp.batch_size * hp.max_seq_length
    per_token = activation_bytes_per_token(model.config, hp.lora_dropout, dtype_bytes, plan.fused_lora)
    if plan.merge_micro_batches:
        merged = tokens_per_pass(len(decoder_layers(model)), per_token, free_gpu_bytes(model), pass_tokens,
                                 pass_tokens * hp.gradient_accumulation_steps)
        plan = replace(plan, merge_micro_batches=bool(merged), tokens_per_pass=merged)
        pass_tokens = merged or pass_tokens
    recomputed, offloaded, host_bytes = apply_checkpointing(model, plan, pass_tokens, per_token, hp.lora_dropout,
                                                            dtype_bytes)
    if plan.compile:
        compile_layers(model)
    notes.append(f"speed: {plan.describe()}; {recomputed} of {len(decoder_layers(model))} decoder layers recompute "
                 "their activations" + (f", {offloaded} keep their input in host memory (up to "
                                        f"{host_bytes / 1e9:.1f} GB)" if plan.checkpointing == "offload" else ""))
    if placement.device.type == "cuda":
        notes.append("CUDA allocator: " + ("expandable segments" if expandable_segments_active(placement.device)
                                           else "fixed segments (PYTORCH_CUDA_ALLOC_CONF as set before CUDA started)"))
    return model, plan, notes


# --- optimizer -----------------------------------------------------------------------------------------------------


def make_optimizer(params: list[torch.nn.Parameter], hp: Hyperparameters, plan: SpeedPlan) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"fused": True} if plan.fused_optimizer else {}
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, **kwargs)
