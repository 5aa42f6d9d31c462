"""What a job will cost before it runs: tokens, steps, time, peak GPU memory and money.

The figures come from `usf-bios bench` on the H200 (docs/benchmarks/nvidia-h200-2026-12-01.json, the engine's
default speed switches; tests/control/test_estimate.py holds the estimate to those measurements):

- Time = trained tokens × 4·N FLOPs ÷ (the GPU's dense bf16 peak × the MFU our engine measured), MFU counted
  as in the bench (4·N per token, recomputation not counted, so its cost is inside the measured MFU). The MFU
  grows with the model (small models are bound by kernel launches): it is interpolated in log N between the
  measured SmolLM2-135M (H100, 2026-11-23) and Llama-3.1-8B points. Other GPUs: that MFU × their peak (the
  H100 has the H200's dense bf16 peak but slower memory: it measured about 6% fewer tokens/s). A quantized model's
  MFU is bf16 LoRA's times a measured ratio that falls with the share of decoder layers the plan recomputes (QLoRA's
  default recomputes only what does not fit, like bf16 LoRA's).
- Peak memory = weights (embeddings and output layer stay 16-bit under quantization) + LoRA weights with their
  gradients and AdamW state + what the decoder layers keep for the backward pass (the engine's own per-token
  estimate, ``engine.memory.activation_estimate``, its choice of layers to recompute and, when micro-batches
  are merged (the default where packing and varlen attention allow), the tokens it puts in one pass, as many as the
  card's memory holds) + the loss slices.
- The CPU figure is what SmolLM2-135M reached on 2 cores here (~65 GFLOP/s effective).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from usf_bios.control.schemas import EstimatePublic
from usf_bios.engine.distributed import choose_strategy
from usf_bios.engine.memory import fused_loss_rows, lora_parameter_count, peak_memory  # noqa: F401  (the memory model)
from usf_bios.spec import JobSpec

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "T4": 65.0}
GPU_MEMORY_GIB = {"H100": 79.2, "H200": 139.8, "A100": 79.2, "L40S": 44.4, "A10G": 22.0, "T4": 14.6}
# (parameters, measured MFU) of our engine, bf16 LoRA, 4096-token rows: SmolLM2-135M on the H100 (2026-11-23), the
# 7-8B models on the H200 (2026-12-01, default plan: loss fused)
MEASURED_LORA_MFU = ((134_515_008, 0.0055), (7_615_616_512, 0.5289), (8_030_261_248, 0.5173))
# QLoRA's MFU ÷ bf16 LoRA's on Llama-3.1-8B, where every decoder layer recomputes (NF4 'all', both with the chunked
# loss in one call, 2026-12-01 evening) and where none does (NF4 'auto' on the H200, one merged pass a step, against
# bf16 LoRA's default, 2026-12-02 calls 2 and 3: docs/benchmarks.md); a share of recomputed layers in between is
# interpolated
MEASURED_QLORA_MFU_RATIO = 0.2772 / 0.5030
MEASURED_QLORA_KEEP_MFU_RATIO = 0.5045 / 0.5104
CPU_EFFECTIVE_TFLOPS = 0.065


def measured_mfu(parameters: int, quantization: str, recomputed_share: float = 0.0) -> float:
    """Our engine's MFU on an H100/H200 for a model of this size, from the bench measurements; a quantized model's
    depends on the share of its decoder layers that recompute (``recomputed_share``, 0 to 1)."""
    points = MEASURED_LORA_MFU
    x = math.log(max(parameters, 1))
    (n0, m0), (n1, m1) = points[0], points[-1]
    if x <= math.log(n0):
        mfu = m0
    elif x >= math.log(n1):
        mfu = m1
    else:
        mfu = m0 + (m1 - m0) * (x - math.log(n0)) / (math.log(n1) - math.log(n0))
    if quantization == "none":
        return mfu
    share = min(max(recomputed_share, 0.0), 1.0)
    return mfu * (MEASURED_QLORA_KEEP_MFU_RATIO + (MEASURED_QLORA_MFU_RATIO - MEASURED_QLORA_KEEP_MFU_RATIO) * share)


def _lookup(table: dict[str, float], gpu_type: str) -> float:
    for key, value in table.items():
        if key.lower() in gpu_type.lower():
            return value
    return table["H100"]


def estimate_job(spec: JobSpec, token_lengths: Sequence[int], model_folder: Path, parameters: int,
                 prices: dict[str, float], sources: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None) -> EstimatePublic:
    """``token_lengths``: every example's length in tokens (before truncation), in dataset order; for a weighted
    mixture ``sources`` holds each example's dataset and ``weights`` each dataset's weight. The training split,
    the weighting and the packed rows are the engine's own (same seeded split and sampling, same bin packing)."""
    from usf_bios.engine.data import pack_rows, split_indices, weigh_training

    hp, gpus = spec.hyperparameters, spec.gpu_config
    config = json.loads((model_folder / "config.json").read_text())
    _, train = split_indices(len(token_lengths), hp.val_split, hp.seed)
    if weights is not None:
        assert sources is not None
        train = weigh_training(train, sources, weights, hp.seed)
    train_lengths = [min(token_lengths[i], hp.max_seq_length) for i in train]
    tokens_per_epoch = sum(train_lengths)
    rows = len(pack_rows(train_lengths, hp.max_seq_length)) if hp.packing else len(train_lengths)
    ranks = gpus.world_size   # a step takes gradient_accumulation_steps micro-batches on every rank
    steps_per_epoch = math.ceil(math.ceil(max(rows, 1) / hp.batch_size) / (hp.gradient_accumulation_steps * ranks))
    steps = hp.max_steps or steps_per_epoch * hp.num_epochs
    trained = round(tokens_per_epoch * steps / max(steps_per_epoch, 1))
    lora = lora_parameter_count(config, hp.lora_r, hp.target_modules)
    if gpus.num_gpus == 0:
        strategy, _ = choose_strategy(spec, ranks, config, parameters, None)
        gpu_type, peak, breakdown = "cpu", False, {}
        seconds = trained * (6 if hp.gradient_checkpointing else 4) * parameters / (CPU_EFFECTIVE_TFLOPS * 1e12)
        assumptions = f"{'6' if hp.gradient_checkpointing else '4'}·N FLOPs per token at 65 GFLOP/s (CPU, measured)"
    else:
        gpu_type, peak = gpus.gpu_type, True
        card = _lookup(GPU_MEMORY_GIB, gpu_type) * 2**30
        strategy, _ = choose_strategy(spec, ranks, config, parameters, card)
        breakdown, recomputed = peak_memory(spec, config, parameters, lora, card,
                                            shards=ranks if strategy == "fsdp" else 1)
        mfu = measured_mfu(parameters, hp.quantization, recomputed)
        rate = _lookup(PEAK_TFLOPS, gpu_type) * 1e12 * mfu * gpus.num_gpus
        seconds = trained * 4 * parameters / rate
        assumptions = (f"4·N FLOPs per token at {mfu:.1%} of {_lookup(PEAK_TFLOPS, gpu_type):.0f} TFLOP/s bf16 per GPU "
                       "(our engine's MFU measured on the H200 by usf-bios bench)")
        if ranks > 1:
            sharded = "; the base weights sharded over them" if strategy == "fsdp" else ""
            assumptions += (f"; {strategy.upper()} over {ranks} GPUs, counted as {ranks} times one GPU's rate (not "
                            f"measured on several GPUs yet){sharded}")
    if gpus.num_gpus == 0:
        device = "the CPU" + (f" ({ranks} ranks sharing its cores)" if ranks > 1 else "")
    else:
        known = next((key for key in PEAK_TFLOPS if key.lower() in gpu_type.lower()), None)
        device = (f"{gpus.num_gpus} × {gpu_type}" if known else
                  f"{gpus.num_gpus} × GPU of type {gpu_type!r}, sized as an H100 80GB")
    price = prices.get(gpu_type, prices.get("any", 0.0)) if gpus.num_gpus else prices.get("cpu", 0.0)
    return EstimatePublic(
        examples=len(token_lengths), tokens_per_epoch=tokens_per_epoch, rows_per_epoch=rows, steps=steps,
        trained_tokens=trained, parameters=parameters, lora_parameters=lora, estimated_seconds=round(seconds, 6),
        peak_vram_gb=round(sum(breakdown.values()), 2) if peak else None, vram_breakdown_gb=breakdown,
        cost=round(seconds / 3600 * max(gpus.num_gpus, 1) * price, 6), price_per_gpu_hour=price, gpu_type=gpu_type,
        assumptions=assumptions, device=device, global_batch=spec.global_batch, strategy=strategy,
    )
