"""LoRA layers as one autograd function each: the ``fused_lora`` speed switch.

peft computes a LoRA linear layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. Under bf16 autocast with
the adapter kept in fp32 that costs, per layer and per step, a round trip of the whole input through fp32 (peft
casts ``x`` to the adapter's dtype, autocast casts it back), a multiply of the whole output by the scale and an
add of two whole outputs, each again in the backward pass, plus an add of the two input gradients. Here:

- forward: ``out = x Wᵀ (+ bias)``, ``h = x Aᵀ``, then ``out += h (scaling · B)ᵀ`` inside the matrix product
  (``addmm_``), all in the compute dtype; ``A`` and ``scaling · B`` are cast to it once per optimizer step;
- backward: ``g_h = g (scaling · B)``, ``grad_B = scaling · gᵀ h`` (scaled and widened to the adapter's dtype
  in one pass), ``grad_A = g_hᵀ x`` and ``grad_x = g W + g_h A`` with the second product accumulated into the
  first; nothing for ``x`` when it needs no gradient (the first layer's inputs).

The arithmetic is the same products, summed in another order (the scale is applied to the small factor and the
sum is rounded once instead of twice), so losses and gradients agree with peft's path to rounding; a test holds
them together. Layers this does not cover (dropout, DoRA and other variants, a LoRA bias, several active
adapters, merged or disabled adapters, extra forward arguments) keep peft's own forward, decided on every call.
A 4-bit base layer (bitsandbytes NF4/FP4) and its adapter are one function too (``_LoraLinear4bit``): its weight
is dequantized once for the forward product and, in a recomputed layer, kept from the recomputed forward for the
backward product (two dequantizations a step instead of three, and none of bitsandbytes' own autograd function
around them). Other base layers (8-bit, unknown types) keep their own product; only the adapter part is fused onto
their output.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _adapter_grads(ctx: Any, g: torch.Tensor, flat: torch.Tensor, b_scaled: torch.Tensor, h: torch.Tensor,
                   need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradient reaching ``h`` (``b_scaled`` = scaling · B) and the adapter's gradients in its own dtypes."""
    g_h = g @ b_scaled
    grad_a = (g_h.t() @ flat).to(ctx.a_dtype) if need_a else None
    grad_b = None
    if need_b:
        product = g.t() @ h
        grad_b = torch.mul(product, ctx.scaling, out=torch.empty(product.shape, dtype=ctx.b_dtype,
                                                                   device=product.device))
    return g_h, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """out = x Wᵀ + bias + (x Aᵀ) (scaling · B)ᵀ with a frozen W and bias; ``a``, ``b_scaled``: A and scaling · B in
    the compute dtype (``lora_a``, ``lora_b`` are the parameters the gradients are for)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dtype: torch.dtype, a: torch.Tensor,
                b_scaled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            w = weight.to(dtype)
            out = F.linear(flat, w, None if bias is None else bias.to(dtype))
            h = flat @ a.t()
            out.addmm_(h, b_scaled.t())
        ctx.save_for_backward(flat, w, a, b_scaled, h)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, w, a, b, h = ctx.saved_tensors
        with torch.autocast(flat.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
            g_h, grad_a, grad_b = _adapter_grads(ctx, g, flat, b, h, *ctx.needs_input_grad[3:5])
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w).addmm_(g_h, a).view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, None, grad_a, grad_b, None, None, None, None)


class _LoraAdd(torch.autograd.Function):
    """out = base_out + (x Aᵀ) (scaling · B)ᵀ, for a base layer that computes its own product (quantized)."""

    @staticmethod
    def forward(ctx: Any, base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dtype: torch.dtype, a: torch.Tensor, b_scaled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            h = flat @ a.t()
            base = base_out.reshape(-1, base_out.shape[-1]).to(dtype)
            out = torch.addmm(base, h, b_scaled.t())
        ctx.save_for_backward(flat, a, b_scaled, h)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.base_dtype = scaling, x.shape, x.dtype, base_out.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*base_out.shape[:-1], out.shape[-1]).to(base_out.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, a, b, h = ctx.saved_tensors
        with torch.autocast(flat.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
            g_h, grad_a, grad_b = _adapter_grads(ctx, g, flat, b, h, *ctx.needs_input_grad[2:4])
            grad_x = (g_h @ a).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
            grad_base = grad.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        return (grad_base, grad_x, grad_a, grad_b, None, None, None, None)


def _dequantize_4bit(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state).to(dtype)


class _LoraLinear4bit(torch.autograd.Function):
    """out = x Wᵀ + bias + (x Aᵀ) (scaling · B)ᵀ for a frozen 4-bit (bitsandbytes NF4/FP4) W: the LoRA layer and its
    quantized projection as one function. W is dequantized once for the forward product; with ``keep`` (the layer
    is recomputed, so this forward runs again right before its backward: the first, checkpointed forward keeps
    nothing) the dequantized W is kept for the backward product instead of being dequantized a third time, one
    layer's weights at a time. Without ``keep`` (a layer that keeps its activations) only the packed W is kept and
    the backward dequantizes it again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype, a: torch.Tensor,
                b_scaled: torch.Tensor, keep: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            w = _dequantize_4bit(packed, quant_state, dtype)
            out = F.linear(flat, w, None if bias is None else bias.to(dtype))
            h = flat @ a.t()
            out.addmm_(h, b_scaled.t())
        if keep:
            ctx.save_for_backward(flat, a, b_scaled, h, w)
        else:
            ctx.save_for_backward(flat, a, b_scaled, h)
            ctx.packed, ctx.quant_state = packed, quant_state
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.dtype = scaling, x.shape, x.dtype, dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        flat, a, b, h = saved[:4]
        with torch.autocast(flat.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
            g_h, grad_a, grad_b = _adapter_grads(ctx, g, flat, b, h, *ctx.needs_input_grad[4:6])
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = saved[4] if len(saved) > 4 else _dequantize_4bit(ctx.packed, ctx.quant_state, ctx.dtype)
                grad_x = (g @ w).addmm_(g_h, a).view(ctx.x_shape).to(ctx.x_dtype)
        ctx.packed = ctx.quant_state = None
        return (grad_x, None, None, None, grad_a, grad_b, None, None, None, None, None)


def _is_frozen_4bit(base: Any) -> bool:
    """A bitsandbytes 4-bit linear layer with its quantized weight in place and nothing of it trained."""
    weight = getattr(base, "weight", None)
    if type(weight).__name__ != "Params4bit" or getattr(weight, "quant_state", None) is None:
        return False
    if not getattr(weight, "bnb_quantized", True) or weight.requires_grad:
        return False
    return base.bias is None or not base.bias.requires_grad


def keep_dequantized_where_recomputed(model: torch.nn.Module, layers: list[torch.nn.Module], offload: bool) -> int:
    """Mark the 4-bit LoRA layers inside recomputed decoder layers (``gradient_checkpointing`` set, or every layer
    under ``offload``) to keep their dequantized weight from the recomputed forward for the backward pass; returns
    how many were marked. The others dequantize again in the backward pass (see ``_LoraLinear4bit``)."""
    count = 0
    for layer in layers:
        keep = offload or bool(getattr(layer, "gradient_checkpointing", False))
        for module in layer.modules():
            if "forward" in vars(module) and hasattr(module, "base_layer"):
                module._usf_keep_dequantized = keep
                count += keep
    return count


def _single_plain_adapter(layer: Any) -> str | None:
    """The one active adapter when this call can take the fused path, else None (peft's forward runs)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _single_plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    scaling, dtype = float(self.scaling[name]), _compute_dtype(x)
    a, b_scaled = _cast_adapter(self, lora_a, lora_b, scaling, dtype)
    base = self.base_layer
    if type(base) is torch.nn.Linear and not base.weight.requires_grad and (
            base.bias is None or not base.bias.requires_grad):
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling, dtype, a, b_scaled)
    if _is_frozen_4bit(base):
        return _LoraLinear4bit.apply(x, base.weight, base.weight.quant_state, base.bias, lora_a, lora_b, scaling, dtype,
                                     a, b_scaled, getattr(self, "_usf_keep_dequantized", False))
    return _LoraAdd.apply(base(x), x, lora_a, lora_b, scaling, dtype, a, b_scaled)


@torch.compiler.disable  # a cache keyed on object ids: left to eager Python when a layer is compiled
def _cast_adapter(layer: Any, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and scaling · B in the compute dtype, made once per optimizer step rather than once per call.

    Kept on the layer and reused while the weights are unchanged: their version counters move when the optimizer
    (or anything else) writes to them in place, and a new parameter object is a new key.
    """
    key = (id(lora_a), lora_a._version, id(lora_b), lora_b._version, scaling, dtype)
    cached = getattr(layer, "_usf_cast", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, lora_a.detach().to(dtype), (lora_b.detach() * scaling).to(dtype))
        layer._usf_cast = cached
    return cached[1], cached[2]


def _linear_lora_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes whose forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""
    from peft.tuners.lora import layer

    classes: list[type] = [layer.Linear]
    try:
        from peft.tuners.lora import bnb
    except ImportError:  # no bitsandbytes
        return tuple(classes)
    classes += [getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)]
    return tuple(classes)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear layer of ``model`` the fused forward; returns how many layers got it."""
    classes = _linear_lora_classes()
    count = 0
    for module in model.modules():
        if type(module) in classes and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
