"""Load the base model and tokenizer, quantize when asked, wrap the model with LoRA, and apply the speed plan
(``build_model``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any

import torch

from usf_bios.engine.attention import use_varlen_attention
from usf_bios.engine.distributed import World
from usf_bios.engine.fused_lora import fuse_lora_layers, keep_dequantized_where_recomputed
from usf_bios.engine.host_embeddings import keep_embeddings_on_host
from usf_bios.engine.loss import head_is_plain
from usf_bios.engine.memory import activation_bytes_per_token, expandable_segments_active, free_gpu_bytes, tokens_per_pass
from usf_bios.engine.offload import apply_checkpointing, decoder_layers
from usf_bios.engine.plan import SpeedPlan, SpeedPlanError
from usf_bios.models.sources import ResolvedModel
from usf_bios.models.validate import weight_files
from usf_bios.spec import JobSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as the spec asks (missing files, no CUDA for QLoRA, …)."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str            # bf16 | fp16 | fp32, after resolving 'auto'

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda" and self.precision in ("bf16", "fp16")


def device_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What the engine refuses on any machine, as (field path, reason): fp16 or a quantized model on the CPU.
    ``choose_placement`` raises the first; the server refuses a submit or an estimate with them before anything
    runs. (Several GPUs are a job of several ranks: the local executor starts it under torchrun.)"""
    hp, gpus = spec.hyperparameters, spec.gpu_config.num_gpus
    problems = []
    if gpus == 0 and hp.precision == "fp16":
        problems.append(("hyperparameters.precision", "fp16 needs a CUDA GPU; use fp32 (or bf16) on the CPU"))
    if spec.gpu_config.strategy == "fsdp" and hp.quantization == "8bit" and spec.gpu_config.world_size > 1:
        problems.append(("gpu_config.strategy", "FSDP2 cannot shard 8-bit (int8) weights; use quantization: 4bit "
                                                "(QLoRA with FSDP) or strategy: ddp"))
    if gpus == 0 and hp.quantization != "none":
        problems.append(("hyperparameters.quantization", f"{hp.quantization} needs a CUDA GPU (bitsandbytes); "
                                                         "set quantization: none to train on the CPU"))
    return problems


def choose_placement(spec: JobSpec, world: World | None = None) -> Placement:
    """CPU when num_gpus is 0, else the first visible GPU (CUDA_VISIBLE_DEVICES decides which) — or, for a rank
    of a job on several GPUs, the rank's own (its LOCAL_RANK)."""
    if problems := device_problems(spec):
        field, reason = problems[0]
        raise ModelLoadError(f"{field}: {reason}")
    hp, gpus = spec.hyperparameters, spec.gpu_config.num_gpus
    if gpus == 0:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise ModelLoadError(f"gpu_config.num_gpus is {gpus} but no CUDA GPU is visible; set gpu_config.num_gpus: 0 "
                             "to train on the CPU")
    else:
        device = torch.device("cuda", world.local_rank if world is not None else 0)
        torch.cuda.set_device(device)
    precision = hp.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("hyperparameters.precision: this GPU has no bf16; use fp16 or fp32")
    if hp.quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError(f"hyperparameters.quantization: {hp.quantization} needs bitsandbytes; "
                                 "install it with `pip install 'usf-bios[gpu]'`")
        if precision == "fp32":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Placement(device, precision)


def needs_remote_code(config: dict) -> bool:
    from transformers import CONFIG_MAPPING

    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def load_tokenizer(model: ResolvedModel, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(quantization: str, compute_dtype: torch.dtype, sharded: bool = False) -> Any:
    """bitsandbytes' settings; ``sharded`` (QLoRA with FSDP, as bitsandbytes and peft document it): the packed
    4-bit weights are stored in the compute dtype (``bnb_4bit_quant_storage``), a float type FSDP can shard with
    the model's other weights."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": compute_dtype} if sharded else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model: ResolvedModel, spec: JobSpec, placement: Placement, config: dict,
                    sharded: bool = False) -> Any:
    """The frozen base model on its device; ``config`` is what ``check_model_folder`` returned. ``sharded`` (FSDP2):
    an unquantized model stays in host memory, and ``engine.fsdp.shard`` moves each rank's shard to its GPU; a 4-bit
    one is quantized on the rank's GPU, whole, before it is sharded."""
    from transformers import AutoModelForCausalLM

    if needs_remote_code(config) and not spec.trust_remote_code:
        raise ModelLoadError(f"{model.name} ships its own model code ({config.get('model_type')}); set "
                             "trust_remote_code: true in the spec if you trust it")
    safetensors, _ = weight_files(model.path)
    hp = spec.hyperparameters
    kwargs: dict[str, Any] = dict(dtype=placement.dtype, trust_remote_code=spec.trust_remote_code,
                                  local_files_only=True, attn_implementation="sdpa",
                                  use_safetensors=bool(safetensors), weights_only=True)
    if hp.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(hp.quantization, placement.dtype, sharded)
        kwargs["device_map"] = {"": placement.device.index or 0}
    base = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
    if hp.quantization == "none" and not sharded:
        base.to(placement.device)
    base.config.use_cache = False
    return base


def apply_lora(base: Any, spec: JobSpec) -> Any:
    """Wrap the base model with trainable LoRA adapters; everything else stays frozen.

    Quantized models are not run through peft's ``prepare_model_for_kbit_training``: it copies the embeddings,
    norms and output layer to fp32 (2 GiB more for an 8B model with a 128k vocabulary, and an fp32 output layer),
    although they stay frozen; the norms compute in fp32 anyway.
    """
    from peft import LoraConfig, get_peft_model

    hp = spec.hyperparameters
    for param in base.parameters():
        param.requires_grad_(False)
    if hp.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # the name in newer transformers 5 releases
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                        target_modules=hp.target_modules, task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(base, config)
    except ValueError as err:
        raise ModelLoadError(f"hyperparameters.target_modules: {err}") from None


def free_gpu_memory() -> None:
    """Collect dropped objects and give cached GPU memory back (call after deleting the model)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- speed switches on the model ---------------------------------------------------------------------------


def apply_fused_kernels(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU in place of the model's own (the loss is chosen separately)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SpeedPlanError(f"performance.fused_kernels: Liger has no kernels for {model_type} models")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)



def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation: the layers share their code, and with
    parameters passed as graph inputs one compiled graph serves them all). Inside the checkpointing wrapper, so a
    recomputed layer runs the compiled code too. Returns how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=None)  # the token count changes between micro-batches: dynamic after the first change
    return len(layers)


def build_model(base: Any, spec: JobSpec, plan: SpeedPlan, placement: Placement) -> tuple[Any, SpeedPlan, list[str]]:
    """Fused kernels and attention on the base model, LoRA, then checkpointing; returns the model, the plan as
    applied (a head that cannot be sliced turns the loss back to ``full``) and lines for the job log."""
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
    if plan.host_embeddings:   # before the pass is sized: the table's GPU memory is free for activations
        moved, note = keep_embeddings_on_host(model, placement.device)
        notes.append(note)
        plan = replace(plan, host_embeddings=moved)
    dtype_bytes = 4 if placement.precision == "fp32" and hp.quantization == "none" else 2
    pass_tokens = hp.batch_size * hp.max_seq_length
    per_token = activation_bytes_per_token(model.config, hp.lora_dropout, dtype_bytes, plan.fused_lora)
    if plan.merge_micro_batches:
        layers = len(decoder_layers(model))
        if plan.checkpointing in ("all", "offload"):
            # all: every layer keeps its input for the pass, one layer its activations; offload: the inputs that do
            # not fit go to host memory, so one layer's activations, its input and the next one's, fetched ahead
            text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            inputs = layers if plan.checkpointing == "all" else 2
            layers, per_pass_token = 1, inputs * text.hidden_size * dtype_bytes + per_token
        else:
            per_pass_token = per_token
        merged = tokens_per_pass(layers, per_pass_token, free_gpu_bytes(model), pass_tokens,
                                 pass_tokens * hp.gradient_accumulation_steps)
        plan = replace(plan, merge_micro_batches=bool(merged), tokens_per_pass=merged)
        pass_tokens = merged or pass_tokens
    recomputed, offloaded, host_bytes = apply_checkpointing(model, plan, pass_tokens, per_token, hp.lora_dropout,
                                                            dtype_bytes)
    if plan.fused_lora and hp.quantization == "4bit":
        keep_dequantized_where_recomputed(model, decoder_layers(model), plan.checkpointing == "offload")
    if plan.compile:
        compile_layers(model)
    notes.append(f"speed: {plan.describe()}; {recomputed} of {len(decoder_layers(model))} decoder layers recompute "
                 "their activations" + (f", {offloaded} keep their input in host memory (up to "
                                        f"{host_bytes / 1e9:.1f} GB)" if plan.checkpointing == "offload" else ""))
    if placement.device.type == "cuda":
        notes.append("CUDA allocator: " + ("expandable segments" if expandable_segments_active(placement.device)
                                           else "fixed segments (PYTORCH_CUDA_ALLOC_CONF as set before CUDA started)"))
    return model, plan, notes
