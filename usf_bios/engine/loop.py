"""The training loop: one function that reads top to bottom.

micro-batches → loss → backward → clip → optimizer step → scheduler → log → eval → checkpoint → stop.

The host never waits for the GPU at a step's end: a step's loss and gradient norm travel to pinned host memory
behind a CUDA event, and are read (and logged) once the next step is queued, so the GPU runs on while the host
logs and collates the next micro-batches. Where the loop needs a step's numbers before going on (evaluation, a
checkpoint, a stop, the last step) it reads them first; a non-finite loss still never reaches a checkpoint.
A step's ``step_seconds`` runs from the end of the step before it (or of the evaluation or checkpoint after that
step) to its own end, on the device's clock: CUDA events on a GPU (the host's view would be off by however far
it runs ahead), the host's clock on the CPU, where each step has finished when the host moves on.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from usf_bios.engine.checkpoint import SavedTraining, TrainerState, save_checkpoint
from usf_bios.engine.data import Batch, TrainingData
from usf_bios.engine.distributed import World, all_sum, any_rank, no_sync
from usf_bios.engine.fsdp import full_value, gather_adapter, gather_optimizer
from usf_bios.engine.events import CheckpointEvent, EvalEvent, EventLog, MetricEvent
from usf_bios.engine.loss import loss_sum
from usf_bios.engine.model import Placement
from usf_bios.engine.plan import SpeedPlan
from usf_bios.spec import Hyperparameters
from usf_bios.status import JobStatus


@dataclass
class TrainingRun:
    """Everything the loop touches, set up by ``engine.run``."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: TrainingData
    placement: Placement
    hp: Hyperparameters
    state: TrainerState
    events: EventLog
    checkpoint_dir: Path
    should_stop: Callable[[], bool]
    plan: SpeedPlan
    show_progress: bool = False
    after_step: Callable[[int], None] | None = None   # called with the step number (the profiler steps with it)
    world: World = World()
    ddp: Any = None   # the DDP- or FSDP2-wrapped loss module when the job runs on several ranks (engine/distributed.py)
    sharded: bool = False   # FSDP2 (engine/fsdp.py): every rank evaluates and gathers the checkpoints with rank 0


def batch_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens, the way the speed plan computes it (under FSDP2 through
    the sharded root, which gathers the parameters)."""
    if run.sharded:
        return run.ddp(batch)
    return loss_sum(run.model, batch, loss=run.plan.loss, attention=run.plan.attention)


def autocast(placement: Placement) -> contextlib.AbstractContextManager:
    if placement.autocast:
        return torch.autocast(device_type=placement.device.type, dtype=placement.dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(run: TrainingRun) -> float | None:
    """Token-mean loss on the validation rows, or None when there are none."""
    batches = run.data.validation_batches()
    if not batches:
        return None
    run.model.eval()
    total, count = torch.zeros((), device=run.placement.device), 0
    for batch in batches:
        count += batch.trained_tokens
        batch = batch.to(run.placement.device)
        with autocast(run.placement):
            total += batch_loss(run, batch)
    run.model.train()
    return float(total) / max(count, 1)


def next_micro_batches(run: TrainingRun) -> list[Batch]:
    """The micro-batches of the next optimizer step, of every rank (``gradient_accumulation_steps`` × world
    size); an epoch's last step may take fewer."""
    state, data, per_epoch = run.state, run.data, run.data.micro_batches_per_epoch
    if state.micro_batch >= per_epoch:
        state.epoch, state.micro_batch = state.epoch + 1, 0
    order = data.epoch_order(state.epoch)
    take = min(run.hp.gradient_accumulation_steps * run.world.size, per_epoch - state.micro_batch)
    if run.plan.tokens_per_pass:
        batches = data.merged_batches(order, state.micro_batch, take, run.plan.tokens_per_pass)
    else:
        batches = [data.micro_batch(order, state.micro_batch + i) for i in range(take)]
    state.micro_batch += take
    return batches


class StepClock:
    """Marks on the device's timeline: a CUDA event recorded behind the queued work on a GPU, the host's clock on
    the CPU (where the work is done by the time the host moves on)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks; ``end`` must have been waited for."""
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


@dataclass
class StepReadout:
    """A queued step's numbers on their way to the host: (loss, gradient norm) copied without blocking into pinned
    memory, and the step's start and end marks (see ``StepClock``); on the CPU the values are there at once."""

    step: int
    epoch: float
    learning_rate: float
    tokens: int
    values: torch.Tensor
    started: Any
    ended: Any

    @classmethod
    def queue(cls, step_loss: torch.Tensor, grad_norm: torch.Tensor, clock: StepClock, started: Any,
              **fields: Any) -> "StepReadout":
        stacked = torch.stack([step_loss.float(), grad_norm.float()])
        if stacked.is_cuda:
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            stacked = host
        return cls(values=stacked, started=started, ended=clock.mark(), **fields)

    def wait(self, clock: StepClock) -> tuple[float, float, float]:
        """(mean loss, gradient norm, seconds the step took), once the step has finished."""
        if clock.cuda:
            self.ended.synchronize()
        loss, grad_norm = self.values.tolist()
        return float(loss), float(grad_norm), max(clock.seconds(self.started, self.ended), 1e-9)


def train(run: TrainingRun) -> JobStatus:
    """Run optimizer steps until ``total_steps`` or a stop request; return completed or cancelled."""
    model, optimizer, scheduler, state, hp, events = run.model, run.optimizer, run.scheduler, run.state, run.hp, run.events
    device = run.placement.device
    scaler = torch.amp.GradScaler("cuda") if run.placement.precision == "fp16" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not run.show_progress)
    task = progress.add_task("train", total=state.total_steps, completed=state.step, loss="–")
    pending: StepReadout | None = None
    clock = StepClock(device)
    step_start = clock.mark()   # where the next step's time starts

    def report(readout: StepReadout) -> None:
        """Wait for a queued step, then log its metric; raise on a non-finite loss."""
        mean_loss, grad_norm, elapsed = readout.wait(clock)
        tokens_per_second = round(readout.tokens / elapsed, 1)
        events.log(f"step {readout.step}/{state.total_steps} loss {mean_loss:.4f} lr {readout.learning_rate:.3g} "
                   f"grad_norm {grad_norm:.3f} {tokens_per_second} tok/s")
        if not math.isfinite(mean_loss):  # in the log, not in the events (JSON has no NaN), and never checkpointed
            raise FloatingPointError(f"the loss became {mean_loss} at step {readout.step}; lower learning_rate")
        events.emit(MetricEvent(
            step=readout.step, epoch=readout.epoch, loss=mean_loss, learning_rate=readout.learning_rate,
            grad_norm=grad_norm if math.isfinite(grad_norm) else None, tokens=readout.tokens,
            step_seconds=round(elapsed, 4), tokens_per_second=tokens_per_second,
            gpu_memory_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None))
        progress.update(task, completed=readout.step, loss=f"{mean_loss:.4f}")

    def settle() -> None:
        """Report the queued step, if any: the loop is about to need its outcome."""
        nonlocal pending
        if pending is not None:
            readout, pending = pending, None
            report(readout)

    world = run.world
    with progress:
        while state.step < state.total_steps:
            if any_rank(run.should_stop(), world, device):   # every rank stops at the same step
                settle()
                if state.step > 0:
                    checkpoint(run)
                events.log(f"stop requested: stopping at step {state.step}")
                return JobStatus.CANCELLED
            with torch.profiler.record_function("usf.next_micro_batches"):
                batches = next_micro_batches(run)
            step_tokens = sum(b.trained_tokens for b in batches)   # of the whole step, every rank's share
            mine, weight = batches[world.rank::world.size], 1.0
            if not mine:   # an epoch's short last step: DDP needs a backward of every rank, this one counts nothing
                mine, weight = batches[:1], 0.0
            step_loss = torch.zeros((), device=device)
            for index, batch in enumerate(mine):
                batch = batch.to(device)
                last = index == len(mine) - 1
                with contextlib.nullcontext() if run.ddp is None or last else no_sync(run.ddp):
                    with autocast(run.placement):
                        summed = batch_loss(run, batch) if run.ddp is None else run.ddp(batch)
                        loss = summed * (weight / max(step_tokens, 1))
                    scaled = loss * world.size if run.ddp is not None else loss   # DDP averages over the ranks
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += loss.detach()
            state.samples_seen += sum(b.rows for b in batches)
            state.tokens_seen += sum(b.real_tokens for b in batches)
            all_sum(step_loss, world)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm_tensor = full_value(torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            learning_rate = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            queued = StepReadout.queue(
                step_loss, grad_norm_tensor, clock, step_start, step=state.step, learning_rate=learning_rate,
                epoch=round(state.epoch + state.micro_batch / run.data.micro_batches_per_epoch, 4),
                tokens=sum(b.real_tokens for b in batches))
            with torch.profiler.record_function("usf.report_previous_step"):
                settle()     # the step before this one; this one is queued behind it and keeps the GPU busy
            pending, step_start = queued, queued.ended
            if run.after_step is not None:
                run.after_step(state.step)
            evaluating = (bool(run.data.val_rows) and (world.is_main or run.sharded)
                          and (state.step % hp.eval_steps == 0 or state.step == state.total_steps))
            saving = state.step % hp.save_steps == 0 and state.step < state.total_steps
            if evaluating or saving or state.step == state.total_steps:
                settle()
            if evaluating:
                events.stage("evaluating")
                validation_loss = evaluate(run)
                if validation_loss is not None:
                    events.emit(EvalEvent(step=state.step, validation_loss=validation_loss))
                    events.log(f"step {state.step} validation_loss {validation_loss:.4f}")
                events.stage("training", total_steps=state.total_steps)
            if saving:
                checkpoint(run)
            if evaluating or saving:
                step_start = clock.mark()   # the next step's time leaves the evaluation and the checkpoint out
        settle()
    return JobStatus.COMPLETED


def checkpoint(run: TrainingRun) -> None:
    """Rank 0 writes a checkpoint of where the run stands; under FSDP2 every rank first gathers its shards of the
    adapter and the optimizer state onto rank 0 (the other ranks of a DDP job have nothing to do)."""
    gathered = None
    if run.sharded:
        gathered = SavedTraining(adapter=gather_adapter(run.model), optimizer=gather_optimizer(run.model, run.optimizer))
    if run.world.is_main:
        path = save_checkpoint(run.checkpoint_dir, run.model, run.optimizer, run.scheduler, run.state,
                               run.hp.save_total_limit, gathered)
        run.events.emit(CheckpointEvent(step=run.state.step, path=str(path)))


def make_optimizer(params: list[torch.nn.Parameter], hp: Hyperparameters, plan: SpeedPlan) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"fused": True} if plan.fused_optimizer else {}
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, **kwargs)
