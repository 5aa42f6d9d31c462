"""The speed plan: what each switch of ``spec.performance`` becomes for this job on this machine.

Each switch has a plain path and a faster one; 'auto' picks the faster one where the machine supports it. The
choice is resolved once into a ``SpeedPlan`` (logged by the engine) and applied where each concern lives:
attention in ``engine/attention.py``, recomputation and offload in ``engine/offload.py``, the memory model both
use (and the estimate) in ``engine/memory.py``, the loss in ``engine/loss.py``, fused LoRA in
``engine/fused_lora.py``, and the rest in ``engine/model.py`` (``build_model``) and ``engine/loop.py``
(``make_optimizer``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from usf_bios.spec import Hyperparameters, Performance

if TYPE_CHECKING:
    from usf_bios.engine.model import Placement


class SpeedPlanError(ValueError):
    """A switch was turned on that this machine cannot honour (for example a CUDA kernel on the CPU)."""


@dataclass(frozen=True)
class SpeedPlan:
    attention: str              # sdpa | varlen
    loss: str                   # full | chunked | fused
    fused_kernels: bool
    fused_optimizer: bool
    checkpointing: str          # none | auto | all | offload (auto becomes a layer count in apply_checkpointing)
    fused_lora: bool = False
    merge_micro_batches: bool = False
    compile: bool = False
    tokens_per_pass: int = 0    # set by build_model when merging: the most tokens one forward/backward pass takes
    host_embeddings: bool = False

    def describe(self) -> str:
        merge = f"merged micro-batches up to {self.tokens_per_pass:,} tokens a pass" if self.tokens_per_pass \
            else "micro-batches as configured"
        return (f"attention {self.attention}, loss {self.loss}, fused kernels {'on' if self.fused_kernels else 'off'}, "
                f"fused LoRA {'on' if self.fused_lora else 'off'}, "
                f"fused AdamW {'on' if self.fused_optimizer else 'off'}, checkpointing {self.checkpointing}, {merge}"
                + (", compiled layers" if self.compile else "")
                + (", input embeddings in host memory" if self.host_embeddings else ""))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _switch(value: str, available: bool, field: str, why: str) -> bool:
    if value == "on" and not available:
        raise SpeedPlanError(f"performance.{field}: {why}")
    return value == "on" or (value == "auto" and available)


def _fused_kernels(perf: Performance, liger: bool, liger_why: str) -> bool:
    """Liger's kernels, except under ``compile``: on a GPU the compiled layers' backward pass received gradients of
    the wrong rank through them (docs/benchmarks.md), so ``auto`` leaves them out and ``on`` is refused."""
    if perf.compile == "on" and liger and perf.fused_kernels != "off":
        if perf.fused_kernels == "on":
            raise SpeedPlanError("performance.fused_kernels: Liger's kernels do not work inside compiled layers; "
                                 "set fused_kernels to auto or off with compile on")
        return False
    return _switch(perf.fused_kernels, liger, "fused_kernels", liger_why)


def auto_loss(perf: Performance, hp: Hyperparameters, liger: bool) -> str:
    """What ``loss: auto`` becomes (``liger``: liger-kernel on a CUDA GPU). Liger's loss measured faster
    (docs/benchmarks.md), but its slices grow with the pass (1/32 of its tokens at Llama's vocabulary) where the
    chunked loss's stay at 256 MiB, so the long-context plan (offload) keeps the chunked one."""
    offload = hp.gradient_checkpointing and perf.checkpointing == "offload"
    return "fused" if liger and not offload else "chunked"


def resolve_plan(perf: Performance, hp: Hyperparameters, placement: "Placement") -> SpeedPlan:
    """The concrete choices for this job on this machine; errors name the field that cannot be honoured."""
    cuda = placement.device.type == "cuda"
    return plan_for(perf, hp, cuda=cuda, liger=cuda and _has("liger_kernel"))


def plan_for(perf: Performance, hp: Hyperparameters, *, cuda: bool, liger: bool) -> SpeedPlan:
    """The plan on a machine with (``cuda``) a CUDA GPU and (``liger``) liger-kernel on it; the estimate asks this
    for the machine a job will run on. Raises SpeedPlanError naming the field a switch cannot be honoured for."""
    liger_why = "needs a CUDA GPU and the liger-kernel package (pip install 'usf-bios[gpu]')"
    attention = perf.attention
    if attention == "auto":
        attention = "varlen" if cuda and hp.packing else "sdpa"
    loss = perf.loss
    if loss == "fused" and not liger:
        raise SpeedPlanError(f"performance.loss: fused {liger_why}")
    if not hp.gradient_checkpointing:
        checkpointing = "none"
    elif perf.checkpointing == "auto":  # on a GPU only the layers that do not fit recompute, quantized or not
        checkpointing = "auto" if cuda else "all"
    else:
        checkpointing = perf.checkpointing
    if loss == "auto":
        loss = auto_loss(perf, hp, liger)
    # auto merges where no layer is recomputed by default; asked for (on), it also merges the passes of a plan that
    # recomputes every layer ('all', 'offload'): fewer, longer passes, each layer's input kept (or offloaded) for
    # the whole pass
    mergeable = cuda and attention == "varlen" and hp.packing
    if perf.merge_micro_batches == "on":
        mergeable = mergeable and checkpointing in ("auto", "none", "all", "offload")
    else:
        mergeable = mergeable and checkpointing in ("auto", "none")
    merge = _switch(perf.merge_micro_batches, mergeable, "merge_micro_batches",
                    "needs a CUDA GPU, packing and varlen attention")
    host_embeddings = perf.host_embeddings == "on" or (perf.host_embeddings == "auto" and cuda
                                                         and checkpointing in ("all", "offload"))
    if host_embeddings and not cuda:
        raise SpeedPlanError("performance.host_embeddings: needs a CUDA GPU (on the CPU the table is in host "
                             "memory already)")
    return SpeedPlan(
        merge_micro_batches=merge, compile=perf.compile == "on",
        attention=attention, loss=loss,
        fused_kernels=_fused_kernels(perf, liger, liger_why),
        fused_optimizer=_switch(perf.fused_optimizer, cuda, "fused_optimizer", "the fused AdamW needs a CUDA GPU"),
        checkpointing=checkpointing, fused_lora=perf.fused_lora != "off", host_embeddings=host_embeddings)
