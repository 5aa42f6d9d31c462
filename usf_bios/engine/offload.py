"""Activation checkpointing: which decoder layers recompute their activations in the backward pass, and the
offloaded kind for the longest contexts.

- ``auto``: recompute only as many decoder layers as GPU memory needs (none when the activations fit);
- ``all``: every layer (non-reentrant ``torch.utils.checkpoint``);
- ``offload``: every layer, with the saved inputs that do not fit on the GPU kept in pinned host memory (in
  pieces, see ``HostCopy``; copied on a side stream while the layers compute, and back one layer ahead of the
  backward pass, see ``HostCopies``), and (without LoRA dropout) the MLP recomputed in slices over long sequences.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Any, Callable

import torch

from usf_bios.engine.host_embeddings import model_device
from usf_bios.engine.memory import (available_host_bytes, check_host_memory, free_gpu_bytes, layers_to_offload,
                                    layers_to_recompute)
from usf_bios.engine.plan import SpeedPlan

MLP_SLICE_TOKENS = 16_384         # the MLP runs in slices of this many tokens when a micro-batch is longer


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


OFFLOAD_PIECE_BYTES = 2**28   # host copies in pieces of this size: PyTorch's pinned-memory cache rounds each
                              # allocation up to a power of two (a 2.9 GB layer input would take 4 GiB)


class HostCopy:
    """A tensor copied to (pinned, from a GPU) host memory in pieces of ``OFFLOAD_PIECE_BYTES``: every piece but the
    last is a power of two, so the pinned-memory cache wastes at most part of one piece per tensor. With a CUDA
    ``stream`` the copies run on it, beside the compute stream, in both directions."""

    def __init__(self, tensor: torch.Tensor, stream: "torch.cuda.Stream | None" = None):
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.stream = stream if tensor.is_cuda else None
        self.fetched: tuple[torch.Tensor, Any] | None = None   # (on the device, its copy's event) once fetched
        flat = tensor.detach().reshape(-1)
        per_piece = max(OFFLOAD_PIECE_BYTES // flat.element_size(), 1)
        self.pieces = []
        if self.stream is not None:  # the copies start once the compute stream has written the tensor
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with self._on_stream():
            for start in range(0, flat.numel(), per_piece):
                part = flat[start:start + per_piece]
                piece = torch.empty(part.shape, dtype=part.dtype, device="cpu", pin_memory=tensor.is_cuda)
                piece.copy_(part, non_blocking=True)
                self.pieces.append(piece)
        if self.stream is not None:  # its memory is not handed out again before the copies have read it
            flat.record_stream(self.stream)

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def fetch(self, device: torch.device) -> None:
        """Start the copy back to ``device`` (on the side stream: it overlaps with what the GPU computes now)."""
        with self._on_stream():
            out = torch.empty(self.shape, dtype=self.dtype, device=device)
            flat, start = out.view(-1), 0
            for piece in self.pieces:
                flat[start:start + piece.numel()].copy_(piece, non_blocking=True)
                start += piece.numel()
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.pieces, self.fetched = [], (out, event)  # the pinned cache reuses a piece only after its copy is done

    def to(self, device: torch.device) -> torch.Tensor:
        """The tensor on ``device``, for the compute stream (fetched now unless ``fetch`` ran earlier)."""
        if self.fetched is None:
            self.fetch(device)
        assert self.fetched is not None
        out, event = self.fetched
        self.fetched = None
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            out.record_stream(current)
        return out


class HostCopies:
    """The inputs one model's layers keep in host memory, in forward order. Each goes to the host on a side CUDA
    stream while the next layers compute, and comes back one layer ahead of its backward pass: a layer's backward
    pass starts the copy of the input whose backward pass comes next (the newest still waiting), so that copy runs
    while this layer is recomputed. One offloaded input at a time is on the GPU ahead of its use
    (``layers_to_offload`` counts it)."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._waiting: list[weakref.ref[HostCopy]] = []   # a copy dies with its autograd graph (an abandoned pass)
        self.fetched_ahead = 0   # how many inputs came back ahead of their backward pass, and how many late
        self.fetched_late = 0

    def keep(self, tensor: torch.Tensor) -> HostCopy:
        stream = None
        if tensor.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(tensor.device)
            stream = self._stream
        copy = HostCopy(tensor, stream)
        self._waiting.append(weakref.ref(copy))
        return copy

    def take(self, copy: HostCopy, device: torch.device) -> torch.Tensor:
        """``copy`` back on the device for its layer's backward pass."""
        if copy.fetched is None:
            self.fetched_late += 1
        return copy.to(device)

    def fetch_next(self, device: torch.device) -> None:
        while self._waiting:
            copy = self._waiting[-1]()
            if copy is not None and (copy.pieces or copy.fetched is not None):
                if copy.fetched is None:
                    copy.fetch(device)
                    self.fetched_ahead += 1
                return
            self._waiting.pop()   # taken already, or its graph is gone


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without keeping its activations; its input waits for the backward pass in pinned host memory
    (``to_host``, through ``copies``) or where it is."""

    @staticmethod
    def forward(ctx: Any, function: Callable[..., Any], to_host: bool, copies: HostCopies, hidden: torch.Tensor,
                *rest: Any) -> torch.Tensor:
        ctx.function, ctx.rest, ctx.device, ctx.copies = function, rest, hidden.device, copies
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        if to_host:
            ctx.saved = copies.keep(hidden)
        else:  # kept where it is; saved the checked way, so an in-place change before the backward pass is an error
            ctx.saved = None
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            out = function(hidden, *rest)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        kept = ctx.copies.take(ctx.saved, ctx.device) if ctx.saved is not None else ctx.saved_tensors[0]
        ctx.saved = None
        ctx.copies.fetch_next(ctx.device)   # the next layer's input comes back while this one is recomputed
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
        return (None, None, None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(function: Callable[..., Any], hidden: torch.Tensor, *rest: Any,
                         to_host: bool = True, copies: HostCopies | None = None) -> torch.Tensor:
    """A drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it for a decoder layer."""
    return _OffloadedLayer.apply(function, to_host, copies if copies is not None else HostCopies(), hidden, *rest)


def _offload_count(model: Any, layers: int, working_bytes: int, layer_input_bytes: int) -> int:
    """Every layer on the CPU; on CUDA only what does not fit (see ``layers_to_offload``), refused when that much
    would not fit in host memory either (``check_host_memory``)."""
    if model_device(model).type != "cuda":
        return layers
    offloaded = layers_to_offload(layers, working_bytes, layer_input_bytes, free_gpu_bytes(model))
    check_host_memory(offloaded * layer_input_bytes, available_host_bytes())
    return offloaded



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
        copies = HostCopies()
        functions = [partial(offloaded_checkpoint, to_host=index < offloaded, copies=copies)
                     for index in range(len(layers))]
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

