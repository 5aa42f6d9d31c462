"""Random-weight models of real shapes, built on the device (no download), optionally quantized to NF4."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from usf_bios.bench.configs import build_config


def build_model(model: str, quantization: str, device: torch.device, dtype: torch.dtype, *,
                layers: int | None = None) -> Any:
    """A ``PreTrainedModel`` with random weights and every parameter frozen; train/eval mode is the caller's.

    ``quantization="4bit"`` (CUDA only) swaps every linear layer of the decoder layers (not the embeddings or
    lm_head) for a bitsandbytes NF4 ``Linear4bit`` with double quantization and ``dtype`` compute, layer by
    layer, and marks the model the way transformers marks a bitsandbytes 4-bit load so that peft and the
    Trainer treat it as one.
    """
    from transformers import AutoModelForCausalLM

    if quantization not in ("none", "4bit"):
        raise ValueError(f"quantization must be 'none' or '4bit', got {quantization!r}")
    device = torch.device(device)
    if quantization == "4bit" and device.type != "cuda":
        raise ValueError(f"quantization '4bit' needs a CUDA device (bitsandbytes), got {device}")
    config = build_config(model)
    config.use_cache = False
    if layers is not None:  # a probe: fewer decoder layers of the same shape
        config.num_hidden_layers = layers
    with torch.device(device):
        built = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    built.config.use_cache = False
    built.requires_grad_(False)
    if quantization == "4bit":
        quantize_decoder_layers(built, dtype)
    return built


def quantize_decoder_layers(model: Any, compute_dtype: torch.dtype) -> None:
    """Replace each ``nn.Linear`` inside the decoder layers by an NF4 ``Linear4bit`` holding its quantized weights.

    One linear at a time: the bf16 weight is quantized on its device and dropped before the next, so the peak
    stays near one bf16 copy of the model.
    """
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.utils.quantization_config import QuantizationMethod

    for layer in model.model.layers:
        targets = [(name, module) for name, module in layer.named_modules()
                   if isinstance(module, nn.Linear) and not isinstance(module, bnb.nn.Linear4bit)]
        for name, linear in targets:
            weight = linear.weight
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                          device="meta")
            quantized.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(weight.device)  # quantizes here
            quantized.quant_state = quantized.weight.quant_state
            if linear.bias is not None:
                quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            quantized.requires_grad_(False)
            layer.set_submodule(name, quantized)
            del linear, weight
    # what from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...), device_map={"": i})
    # leaves on a model: peft's prepare_model_for_kbit_training and LoRA dispatch read is_loaded_in_4bit; the
    # Trainer and accelerate skip .to(device) for a bitsandbytes model placed by hf_device_map
    device = model.model.embed_tokens.weight.device
    model.is_loaded_in_4bit = True
    model.hf_device_map = {"": device.index if device.index is not None else torch.cuda.current_device()}
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype)
    torch.cuda.empty_cache()
