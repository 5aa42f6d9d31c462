"""What a job will cost before it runs: tokens, steps, time, peak GPU memory and money.

Time = trained tokens × FLOPs per token ÷ (the GPU's dense bf16 peak × an assumed utilisation).
LoRA needs 4·N FLOPs per token (forward 2N, backward through the frozen weights 2N, no weight
gradients), 6·N with gradient checkpointing (the forward again). N = the base model's parameters.
Until `usf-bios bench` measurements replace them, the utilisation figures below are assumptions,
and the CPU figure is what SmolLM2-135M reached on 2 cores here (~65 GFLOP/s effective).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from usf_bios.spec import JobSpec

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "T4": 65.0}
ASSUMED_MFU = 0.35
CPU_EFFECTIVE_TFLOPS = 0.065
BYTES_PER_WEIGHT = {"none": 2.0, "4bit": 0.56, "8bit": 1.06}


@dataclass(frozen=True)
class Estimate:
    examples: int
    tokens_per_epoch: int
    rows_per_epoch: int
    steps: int
    trained_tokens: int
    parameters: int
    lora_parameters: int
    estimated_seconds: float
    peak_vram_gb: float | None
    vram_breakdown_gb: dict[str, float]
    cost: float
    price_per_gpu_hour: float
    gpu_type: str
    assumptions: str

    def as_dict(self) -> dict:
        return asdict(self)


def lora_parameter_count(config: dict, r: int, target_modules: str | list[str]) -> int:
    """LoRA weights (A and B) on the attention and MLP projections of a decoder."""
    h = int(config.get("hidden_size", 0))
    inter = int(config.get("intermediate_size", 4 * h))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or h // max(heads, 1))
    kv = kv_heads * head_dim
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = shapes if target_modules == "all-linear" else [m for m in target_modules if m in shapes]
    per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in names)
    return per_layer * int(config.get("num_hidden_layers", 0))


def _peak_tflops(gpu_type: str) -> float:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in gpu_type.lower():
            return value
    return PEAK_TFLOPS["H100"]


def _vram(spec: JobSpec, config: dict, parameters: int, lora: int) -> dict[str, float]:
    hp = spec.hyperparameters
    h = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 0))
    vocab = int(config.get("vocab_size", 0))
    tokens = hp.batch_size * hp.max_seq_length
    gib = 2**30
    if hp.gradient_checkpointing:
        activations = (layers * tokens * h * 2 + tokens * h * 34) / gib
    else:
        activations = layers * tokens * h * 34 / gib
    return {
        "weights": round(parameters * BYTES_PER_WEIGHT[hp.quantization] / gib, 3),
        "lora_and_optimizer": round(lora * 16 / gib, 3),
        "activations": round(activations, 3),
        "logits": round(tokens * vocab * 4 * 2 / gib, 3),
        "cuda_overhead": 0.5,
    }


def estimate_job(spec: JobSpec, token_lengths: list[int], model_folder: Path, parameters: int,
                 prices: dict[str, float]) -> Estimate:
    """``token_lengths``: every example's length in tokens (before truncation)."""
    hp, gpus = spec.hyperparameters, spec.gpu_config
    config = json.loads((model_folder / "config.json").read_text())
    train_lengths = token_lengths[: len(token_lengths) - math.floor(len(token_lengths) * hp.val_split)]
    tokens_per_epoch = sum(min(n, hp.max_seq_length) for n in train_lengths)
    rows = math.ceil(tokens_per_epoch / hp.max_seq_length * 1.02) if hp.packing else len(train_lengths)
    steps_per_epoch = math.ceil(math.ceil(max(rows, 1) / hp.batch_size) / hp.gradient_accumulation_steps)
    steps = hp.max_steps or steps_per_epoch * hp.num_epochs
    trained = round(tokens_per_epoch * steps / max(steps_per_epoch, 1))
    lora = lora_parameter_count(config, hp.lora_r, hp.target_modules)
    flops_per_token = (6 if hp.gradient_checkpointing else 4) * parameters
    if gpus.num_gpus == 0:
        rate, gpu_type, peak = CPU_EFFECTIVE_TFLOPS * 1e12, "cpu", None
    else:
        rate, gpu_type = _peak_tflops(gpus.gpu_type) * 1e12 * ASSUMED_MFU * gpus.num_gpus, gpus.gpu_type
        peak = True
    seconds = trained * flops_per_token / rate
    breakdown = _vram(spec, config, parameters, lora) if peak else {}
    price = prices.get(gpu_type, prices.get("any", 0.0)) if gpus.num_gpus else prices.get("cpu", 0.0)
    return Estimate(
        examples=len(token_lengths), tokens_per_epoch=tokens_per_epoch, rows_per_epoch=rows, steps=steps,
        trained_tokens=trained, parameters=parameters, lora_parameters=lora, estimated_seconds=round(seconds, 6),
        peak_vram_gb=round(sum(breakdown.values()), 2) if peak else None, vram_breakdown_gb=breakdown,
        cost=round(seconds / 3600 * max(gpus.num_gpus, 1) * price, 6), price_per_gpu_hour=price, gpu_type=gpu_type,
        assumptions=(f"{'6' if hp.gradient_checkpointing else '4'}·N FLOPs per token; "
                     + ("CPU at 65 GFLOP/s effective" if gpus.num_gpus == 0
                        else f"{ASSUMED_MFU:.0%} of {_peak_tflops(gpus.gpu_type):.0f} TFLOP/s bf16 peak per GPU")),
    )
