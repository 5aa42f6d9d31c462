"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a job whose model one GPU cannot hold (``strategy: fsdp``).

Each decoder layer is one FSDP unit, and the model together with its loss (``distributed.LossModule``) is the
root, so the embeddings, the last norm and the output layer are gathered by the root's forward even where the
chunked or fused loss calls the decoder and the output layer directly. Every parameter — the frozen base and the
LoRA adapter — is sharded over the ranks (a DTensor of 1/W of the rows each); only the adapter has gradients,
reduce-scattered (averaged) like DDP's all-reduce, so the loop's loss scaling is the same for both. Between the
micro-batches of a step the gradients accumulate without communication (``set_requires_gradient_sync``): LoRA's
unsharded gradients are small.

Checkpoints and the output hold what one process would save: the adapter's full tensors
(``get_model_state_dict`` with ``full_state_dict``, ``cpu_offload`` and ``ignore_frozen_params``: the base is never
gathered) and the optimizer's full state (keyed by parameter name), gathered on rank 0, which writes them. A resume
restores the adapter before sharding and shards the saved optimizer state onto each rank.

QLoRA with FSDP follows what bitsandbytes and peft document for it: ``bnb_4bit_quant_storage`` is the compute
dtype, so the packed 4-bit weights are bf16 tensors FSDP2 shards with the others (``model.quantization_config``).
It needs CUDA (bitsandbytes) and has not been run yet: no machine of several GPUs has been lent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from usf_bios.engine.distributed import LossModule, World
from usf_bios.engine.plan import SpeedPlan


def fsdp_plan(plan: SpeedPlan) -> tuple[SpeedPlan, list[str]]:
    """The speed plan under FSDP2, and a line for each switch it turns off, with why."""
    off: list[str] = []
    if plan.fused_lora:
        off.append("fused LoRA off: it keeps each step's compute-dtype copy of the LoRA weights, which under FSDP2 "
                   "exist only while a layer's parameters are gathered")
    if plan.merge_micro_batches:
        off.append("merged micro-batches off: a pass is sized from the GPU memory left beside the whole model, "
                   "which FSDP2 never holds")
    if plan.compile:
        off.append("compiled layers off: regional compilation has not been verified with FSDP2's hooks")
    if plan.host_embeddings:
        off.append("host embeddings off: FSDP2 shards the embedding table with the rest of the model")
    checkpointing = plan.checkpointing
    if checkpointing in ("auto", "offload"):
        off.append(f"checkpointing {checkpointing} becomes all: it plans from the free memory beside the whole "
                   "model; under FSDP2 every decoder layer recomputes")
        checkpointing = "all"
    plan = replace(plan, fused_lora=False, merge_micro_batches=False, tokens_per_pass=0, compile=False,
                   checkpointing=checkpointing, host_embeddings=False)
    return plan, [f"FSDP2: {line}" for line in off]


def shard(model: Any, loss_fn: Callable[[Any, Any], torch.Tensor], device: torch.device, dtype: torch.dtype,
          world: World) -> torch.nn.Module:
    """The model and its loss as one FSDP2 root over the job's ranks, each decoder layer a unit of its own; the
    parameters move to ``device`` (each rank's shard only). Compute in ``dtype`` (gradients reduced in fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from usf_bios.engine.offload import decoder_layers

    mesh = init_device_mesh(device.type, (world.size,))
    options: dict[str, Any] = {"mesh": mesh}
    if dtype != torch.float32:   # one dtype for every gathered parameter: the frozen base's and the fp32 adapter's
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    root = LossModule(model, loss_fn)
    fully_shard(root, **options)
    return root


def gather_adapter(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's full tensors on rank 0's CPU (an empty dict on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def gather_optimizer(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state, keyed by parameter name, on rank 0's CPU; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A saved full optimizer state (``gather_optimizer``), sharded onto this rank's parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (the gradient norm clip_grad_norm_ returns over sharded gradients); a tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
