"""Model shapes (public config values, no download) and the benchmark configurations run against them."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

# Values copied from the public config.json of each model. `model_type` picks the transformers config class;
# the rest are that class's keyword arguments (transformers 5 keeps RoPE settings in `rope_parameters`).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,  # 32768 in the instruct config; longer for the context-length search
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "tiny-llama": {  # for tests: a few hundred thousand parameters
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def _unknown(kind: str, name: str, known: Any) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def build_config(model: str) -> Any:
    """The transformers config (a ``PretrainedConfig``) of a model in MODEL_SHAPES."""
    from transformers import CONFIG_MAPPING

    if model not in MODEL_SHAPES:
        raise _unknown("model", model, MODEL_SHAPES)
    shape = copy.deepcopy(MODEL_SHAPES[model])
    return CONFIG_MAPPING[shape.pop("model_type")](**shape)


def parameter_count(model: str) -> int:
    """Base-model parameters, embeddings included (tied weights once), counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(build_config(model))
    return sum(p.numel() for p in meta.parameters())


QUANTIZATIONS = ("none", "4bit")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: str                       # a key of MODEL_SHAPES
    quantization: str                # none | 4bit (NF4, double quantization, bf16 compute)
    seq_len: int                     # longest example; our engine's packing capacity
    examples_per_step: int = 16      # examples per optimizer step, the same on both sides
    baseline_micro_batch: int = 4    # the baseline's per-device batch; accumulation makes up the rest
    warmup_steps: int = 2            # optimizer steps run but not timed
    timed_steps: int = 6
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 1e-4
    seed: int = 0
    precision: str = "bf16"          # dtype of the unquantized weights and of the compute

    def __post_init__(self) -> None:
        if self.model not in MODEL_SHAPES:
            raise _unknown("model", self.model, MODEL_SHAPES)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"{self.name}: quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {', '.join(PRECISIONS)}")
        if self.examples_per_step % self.baseline_micro_batch:
            raise ValueError(f"{self.name}: examples_per_step ({self.examples_per_step}) must be a multiple of "
                             f"baseline_micro_batch ({self.baseline_micro_batch})")
        if self.timed_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"{self.name}: needs at least one timed step and no negative warm-up")

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def num_examples(self) -> int:
        """Examples consumed by one run: every step takes the next examples_per_step of them, in order."""
        return self.steps * self.examples_per_step


CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    BenchConfig("llama3.1-8b-lora-bf16-4096", "llama3.1-8b", "none", 4096),
    BenchConfig("qwen2.5-7b-lora-bf16-4096", "qwen2.5-7b", "none", 4096),
    BenchConfig("llama3.1-8b-qlora-nf4-4096", "llama3.1-8b", "4bit", 4096),
    BenchConfig("smollm2-135m-lora-bf16-2048", "smollm2-135m", "none", 2048),
    BenchConfig("tiny-llama-lora-fp32-256", "tiny-llama", "none", 256, examples_per_step=8, baseline_micro_batch=4,
                warmup_steps=1, timed_steps=2, learning_rate=1e-3, precision="fp32"),
)}


WORKLOADS = ("packed", "full-rows")
FULL_ROWS_PER_STEP = 4    # full-rows: each step 4 examples of seq_len tokens (16,384 tokens at 4096, as packed's 4 rows)


def workload_config(cfg: BenchConfig, workload: str) -> BenchConfig:
    """The configuration a workload runs: ``packed`` as it is (examples of many lengths, packed into rows by our
    side); ``full-rows`` with FULL_ROWS_PER_STEP examples a step, each exactly seq_len tokens long (each row one
    example, no packing and no padding on any side)."""
    if workload not in WORKLOADS:
        raise _unknown("workload", workload, WORKLOADS)
    if workload == "packed":
        return cfg
    return replace(cfg, examples_per_step=FULL_ROWS_PER_STEP,
                   baseline_micro_batch=math.gcd(cfg.baseline_micro_batch, FULL_ROWS_PER_STEP))


def get_config(name: str) -> BenchConfig:
    """The benchmark configuration called ``name``; an error lists the known names."""
    if name not in CONFIGS:
        raise _unknown("bench config", name, CONFIGS)
    return CONFIGS[name]
