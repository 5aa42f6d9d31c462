"""Data parallelism over several processes (``torchrun``): PyTorch's DistributedDataParallel, one process per GPU
(or per CPU worker with the gloo backend).

The launcher (torchrun) sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous; the engine reads them here. Every
rank holds the whole dataset and the same seeded epoch order: an optimizer step takes
``gradient_accumulation_steps × world size`` micro-batches, rank r computes every world-size-th of them, and
each micro-batch's token-summed loss is divided by the whole step's trained tokens (known on every rank without
talking), so the averaged gradient is the one a single process computes on the same global batch. Rank 0 alone
writes events, checkpoints and the output; a stop request is agreed on by all ranks at each step, so every rank
stops at the same one; every collective has a timeout (USF_DIST_TIMEOUT_S), so a rank that dies fails the others
instead of hanging them.

A rank whose peer is lost (a collective failed: a rank was killed, its node went away) does not end the job as
failed: rank 0 writes no ``done`` event (unless a peer recorded a failure of its own, which it reports), so the
control plane finds the job's process gone without a word, marks it interrupted and resumes it from its newest
checkpoint (``USF_MAX_ATTEMPTS``). Under torchrun each rank dies with its launcher (``die_with_launcher``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from usf_bios.spec import JobSpec

@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place among the job's ranks, as torchrun describes it (one rank when not launched by it)."""
    return World(size=int(os.environ.get("WORLD_SIZE", "1")), rank=int(os.environ.get("RANK", "0")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def die_with_launcher(world: World) -> None:
    """Under torchrun, have the kernel SIGKILL this rank when torchrun ends (PR_SET_PDEATHSIG): torchrun starts each
    rank in a session of its own, so a SIGKILL of torchrun's process group would otherwise leave the ranks running."""
    if not world.distributed or "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:   # torchrun ended before the call took effect
        os.kill(os.getpid(), signal.SIGKILL)


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroupNCCL",
              "NCCL communicator was aborted", "Timed out waiting", "timed out", "Socket Timeout")


def peer_lost(err: BaseException, world: World) -> bool:
    """Whether a failure of a job on several ranks is a collective that lost another rank (or timed out waiting for
    it), rather than a fault of this rank's own work."""
    if not world.distributed:
        return False
    if isinstance(err, torch.distributed.DistError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_LOST)


def start(world: World, device_type: str) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU), with the collectives' timeout."""
    if not world.distributed or torch.distributed.is_initialized():
        return
    from usf_bios.settings import get_settings

    timeout = timedelta(seconds=get_settings().dist_timeout_s)
    torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)


def stop() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum over ranks (in place), or the tensor itself with one rank."""
    if world.distributed:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop request, seen by one rank first)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


class LossModule(torch.nn.Module):
    """The model and its loss as one module, so DDP's forward (which arms the gradient all-reduce) wraps the whole
    computation — the chunked and fused losses call the decoder directly, past the model's own forward."""

    def __init__(self, model: Any, loss_fn: Any):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


def wrap_ddp(model: Any, loss_fn: Any, world: World) -> torch.nn.Module:
    """DDP over the model's trainable (LoRA) parameters; the frozen base is not synchronised (it never changes)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(LossModule(model, loss_fn), device_ids=None, broadcast_buffers=False,
                                   find_unused_parameters=False)


@contextmanager
def no_sync(wrapped: Any) -> Iterator[None]:
    """Inside: the gradients of a step's micro-batches before its last accumulate without communication (DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def choose_strategy(spec: "JobSpec", ranks: int, config: dict, parameters: int | None,
                    gpu_bytes: float | None) -> tuple[str, str]:
    """How a job of ``ranks`` ranks (the spec's world size, or torchrun's where it was started by hand) splits the
    work — ``single`` (one rank), ``ddp`` or ``fsdp`` — and why, for the log and the estimate. ``auto`` asks the
    estimate's memory model (``engine.memory.peak_memory``) whether one GPU of ``gpu_bytes`` holds the (quantised)
    model with its adapter, optimizer and activations: ddp if so, else fsdp. On the CPU (``gpu_bytes`` None) auto
    is ddp: every rank holds the model in host memory; 8-bit weights are ddp too (FSDP2 cannot shard int8)."""
    from usf_bios.engine.memory import lora_parameter_count, peak_memory

    gpu, hp = spec.gpu_config, spec.hyperparameters
    if ranks == 1:
        return "single", "one rank"
    if gpu.strategy != "auto":
        return gpu.strategy, f"strategy {gpu.strategy}, as the spec asks"
    if hp.quantization == "8bit":
        return "ddp", "strategy auto with 8-bit weights, which FSDP2 cannot shard: each GPU holds the model whole"
    if gpu.num_gpus == 0 or gpu_bytes is None:
        return "ddp", "strategy auto on the CPU: each rank holds the model in host memory (strategy: fsdp shards it)"
    if parameters is None:
        return "ddp", "strategy auto, and the model's size is unknown (no safetensors headers): each GPU holds it whole"
    parts, _ = peak_memory(spec, config, parameters, lora_parameter_count(config, hp.lora_r, hp.target_modules),
                           gpu_bytes)
    need, has = sum(parts.values()), gpu_bytes / 2**30
    if need <= has:
        return "ddp", (f"strategy auto: one GPU holds the model ({need:.1f} of its {has:.1f} GiB by the estimate's "
                       "memory model), so each rank keeps a whole copy")
    return "fsdp", (f"strategy auto: one GPU would need {need:.1f} GiB of its {has:.1f} GiB (the estimate's memory "
                    f"model), so FSDP2 shards the base weights over the {ranks} GPUs")
