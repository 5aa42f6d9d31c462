"""The engine's memory model: what the decoder layers keep for the backward pass, how much of it fits, and the
CUDA allocator's mode.

``build_model`` plans recomputation, merged passes and offload with these functions; the job estimate
(``control/estimate.py``) calls ``peak_memory`` (and through it ``activation_estimate``) for the same figures before
a job runs, and the engine asks ``peak_memory`` whether a job of several GPUs fits one (``strategy: auto``).
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from usf_bios.engine.host_embeddings import model_device
from usf_bios.engine.plan import SpeedPlanError

if TYPE_CHECKING:
    from usf_bios.spec import JobSpec

HEADROOM_BYTES = 3 * 2**30        # kept free for the loss slices, the optimizer and the allocator's slack
ALLOCATOR_SETTING = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
ACTIVATION_SLACK = 1.25           # activation_bytes_per_token's margin over its own count
BITS_PER_QUANTIZED_WEIGHT = {"4bit": 4.13, "8bit": 8.13}   # NF4 / int8 plus their (double-quantized) scales


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
    return math.ceil(ACTIVATION_SLACK * elements * dtype_bytes)


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
    device = model_device(model)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def tokens_per_pass(num_layers: int, per_token_bytes: int, free_bytes: int, micro_batch_tokens: int,
                    step_tokens: int) -> int:
    """How many tokens one merged pass may take: as many as keep every layer's activations within ``free_bytes``
    (less the headroom), at most a whole step's; 0 when that is no more than one configured micro-batch."""
    fit = max(free_bytes - HEADROOM_BYTES, 0) // max(num_layers * per_token_bytes, 1)
    tokens = min(step_tokens, fit)
    return tokens if tokens > micro_batch_tokens else 0


def layers_to_offload(num_layers: int, working_bytes: int, layer_input_bytes: int, free_bytes: int) -> int:
    """How many layers' saved inputs (``layer_input_bytes`` each) must go to host memory: those that do not fit on
    the GPU beside the working set of the layer being recomputed (tokens × ``activation_bytes_per_token``) and the
    headroom, and, once any go to the host, the one fetched back ahead of its backward pass."""
    room = free_bytes - HEADROOM_BYTES - working_bytes
    on_gpu = max(0, min(num_layers, room // max(layer_input_bytes, 1)))
    if on_gpu < num_layers:
        on_gpu = max(0, on_gpu - 1)
    return num_layers - on_gpu


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


@dataclass(frozen=True)
class ActivationEstimate:
    """What the decoder layers keep for the backward pass at the largest pass (without the planning slack)."""

    tokens_per_pass: int        # tokens of the largest forward/backward pass (merged, or one micro-batch)
    bytes: float
    recomputed_share: float = 0.0   # the share of decoder layers that recompute their activations


def activation_estimate(config: Any, *, checkpointing: str, merge: bool, micro_batch_tokens: int, step_tokens: int,
                        free_bytes: int, lora_dropout: float, fused_lora: bool, dtype_bytes: int = 2) -> ActivationEstimate:
    """The activations ``build_model`` will plan for, before a job runs: ``checkpointing`` as a SpeedPlan has it
    (none | auto | all | offload), ``merge`` whether micro-batches merge, ``free_bytes`` the GPU memory left beside
    the weights and the adapter. The planning estimate carries ``ACTIVATION_SLACK``; the figure returned is
    without it (the measured peaks sit there)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    planned = activation_bytes_per_token(config, lora_dropout, dtype_bytes, fused_lora)
    per_token = planned / ACTIVATION_SLACK
    tokens = micro_batch_tokens
    if merge:
        tokens = tokens_per_pass(layers, planned, free_bytes, micro_batch_tokens, step_tokens) or micro_batch_tokens
    one_layer, layer_input = tokens * per_token, tokens * hidden * dtype_bytes
    k = layers
    if checkpointing == "none":
        kept, k = layers * one_layer, 0
    elif checkpointing == "offload":
        kept = one_layer
    elif checkpointing == "all":
        kept = layers * layer_input + one_layer
    else:  # auto: only the layers that do not fit recompute
        k = layers_to_recompute(layers, tokens, planned, hidden * dtype_bytes, free_bytes)
        kept = (layers - k) * one_layer + k * layer_input + (one_layer if k else 0)
    return ActivationEstimate(tokens, kept, k / max(layers, 1))


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


def fused_loss_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of one slice of Liger's fused linear cross-entropy (what ``loss: auto`` picks on a GPU with
    liger-kernel): the power of two at or above tokens ÷ ⌈vocab ÷ hidden⌉, so its slices grow with the pass (bf16
    logits with their gradient written in place, counted here as 4 bytes each with the fp32 reductions)."""
    slices = max(1, math.ceil(vocab / max(hidden, 1)))
    return min(tokens, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / slices)))))


def peak_memory(spec: "JobSpec", config: dict, parameters: int, lora: int, gpu_bytes: float,
                shards: int = 1) -> tuple[dict[str, float], float]:
    """One GPU's peak memory for the job, in parts (GiB), and the share of decoder layers that will recompute:
    the job estimate's figure, and the engine's test whether a model fits one GPU (``strategy: auto``).
    ``config`` is the model's config.json, ``parameters`` its weights, ``lora`` the adapter's
    (``lora_parameter_count``), ``gpu_bytes`` the card's memory, ``shards`` the ranks FSDP spreads the base weights
    over (1: each GPU holds them whole). Raises SpeedPlanError where the engine would refuse the job's speed
    switches on a GPU host."""
    from types import SimpleNamespace

    from usf_bios.engine.loss import CHUNK_ELEMENTS
    from usf_bios.engine.plan import plan_for

    hp = spec.hyperparameters
    gib = 2**30
    h = int(config.get("hidden_size", 0))
    vocab = int(config.get("vocab_size", 0))
    tokens = hp.batch_size * hp.max_seq_length
    shape = SimpleNamespace(hidden_size=h, intermediate_size=int(config.get("intermediate_size", 4 * h)),
                            num_hidden_layers=int(config.get("num_hidden_layers", 0)),
                            num_attention_heads=int(config.get("num_attention_heads", 1)),
                            num_key_value_heads=config.get("num_key_value_heads"), head_dim=config.get("head_dim"))
    plan = plan_for(spec.performance, hp, cuda=True, liger=True)   # a GPU host with the [gpu] extra
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    if hp.quantization == "none":
        weights = parameters * 2
    else:
        weights = embeddings * 2 + (parameters - embeddings) * BITS_PER_QUANTIZED_WEIGHT[hp.quantization] / 8
    if plan.host_embeddings and not config.get("tie_word_embeddings") and spec.gpu_config.world_size == 1:
        weights -= vocab * h * 2        # the input table stays in host memory (a job of one rank: engine/run.py)
    weights /= shards
    lora_bytes = lora * 16                                             # fp32 weight, gradient, two AdamW moments
    free = gpu_bytes - weights - lora_bytes
    kept = activation_estimate(shape, checkpointing=plan.checkpointing, merge=plan.merge_micro_batches,
                               micro_batch_tokens=tokens, step_tokens=tokens * hp.gradient_accumulation_steps,
                               free_bytes=int(free), lora_dropout=hp.lora_dropout, fused_lora=plan.fused_lora)
    activations, tokens = kept.bytes, kept.tokens_per_pass
    if plan.loss == "full":
        logit_rows, logit_bytes = tokens, 8
    elif plan.loss == "fused":
        logit_rows, logit_bytes = fused_loss_rows(tokens, vocab, h), 4
    else:
        logit_rows, logit_bytes = min(tokens, max(1, CHUNK_ELEMENTS // max(vocab, 1))), 6
    return {
        "weights": round(weights / gib, 3),
        "lora_and_optimizer": round(lora_bytes / gib, 3),
        "activations": round(activations / gib, 3),
        "logits": round(logit_rows * vocab * logit_bytes / gib, 3),
        "cuda_overhead": round(min(HEADROOM_BYTES, 2**28 + weights // 100) / gib, 3),
    }, kept.recomputed_share
