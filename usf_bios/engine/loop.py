"""The training loop: one function that reads top to bottom.

micro-batches → loss → backward → clip → optimizer step → scheduler → log → eval → checkpoint → stop.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from usf_bios.engine.checkpoint import TrainerState, save_checkpoint
from usf_bios.engine.data import IGNORE, Batch, TrainingData
from usf_bios.engine.events import EventLog
from usf_bios.engine.model import Placement
from usf_bios.spec import Hyperparameters


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
    show_progress: bool = False


def token_losses(model: Any, batch: Batch) -> torch.Tensor:
    """Per-position cross-entropy (0 where the target is ignored), shape (rows, length)."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    losses = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none")
    return losses.view_as(batch.targets)


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
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(run.placement.device)
        with autocast(run.placement):
            total += float(token_losses(run.model, batch).sum())
        count += batch.trained_tokens
    run.model.train()
    return total / max(count, 1)


def next_micro_batches(run: TrainingRun) -> list[Batch]:
    """The micro-batches of the next optimizer step; an epoch's last step may take fewer."""
    state, data, per_epoch = run.state, run.data, run.data.micro_batches_per_epoch
    if state.micro_batch >= per_epoch:
        state.epoch, state.micro_batch = state.epoch + 1, 0
    order = data.epoch_order(state.epoch)
    take = min(run.hp.gradient_accumulation_steps, per_epoch - state.micro_batch)
    batches = [data.micro_batch(order, state.micro_batch + i) for i in range(take)]
    state.micro_batch += take
    return batches


def train(run: TrainingRun) -> str:
    """Run optimizer steps until ``total_steps`` or a stop request; return 'completed' or 'cancelled'."""
    model, optimizer, scheduler, state, hp, events = run.model, run.optimizer, run.scheduler, run.state, run.hp, run.events
    device = run.placement.device
    scaler = torch.amp.GradScaler("cuda") if run.placement.precision == "fp16" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not run.show_progress)
    task = progress.add_task("train", total=state.total_steps, completed=state.step, loss="–")
    with progress:
        while state.step < state.total_steps:
            if run.should_stop():
                if state.step > 0:
                    path = save_checkpoint(run.checkpoint_dir, model, optimizer, scheduler, state, hp.save_total_limit)
                    events.emit("checkpoint", step=state.step, path=str(path))
                events.log(f"stop requested: stopping at step {state.step}")
                return "cancelled"
            started = time.perf_counter()
            batches = next_micro_batches(run)
            step_tokens = sum(b.trained_tokens for b in batches)
            loss_sum = 0.0
            for batch in batches:
                batch = batch.to(device)
                with autocast(run.placement):
                    loss = token_losses(model, batch).sum() / max(step_tokens, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
                state.samples_seen += batch.input_ids.shape[0]
                state.tokens_seen += batch.real_tokens
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            learning_rate = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            metric = {
                "step": state.step,
                "epoch": round(state.epoch + state.micro_batch / run.data.micro_batches_per_epoch, 4),
                "loss": loss_sum,
                "learning_rate": learning_rate,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                "tokens_per_second": round(sum(b.real_tokens for b in batches) / elapsed, 1),
                "gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
            }
            events.emit("metric", **metric)
            events.log(f"step {state.step}/{state.total_steps} loss {loss_sum:.4f} lr {learning_rate:.3g} "
                       f"grad_norm {grad_norm:.3f} {metric['tokens_per_second']} tok/s")
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"the loss became {loss_sum} at step {state.step}; lower learning_rate")
            progress.update(task, completed=state.step, loss=f"{loss_sum:.4f}")
            if run.data.val_rows and (state.step % hp.eval_steps == 0 or state.step == state.total_steps):
                events.stage("evaluating")
                validation_loss = evaluate(run)
                if validation_loss is not None:
                    events.emit("eval", step=state.step, validation_loss=validation_loss)
                    events.log(f"step {state.step} validation_loss {validation_loss:.4f}")
                events.stage("training", total_steps=state.total_steps)
            if state.step % hp.save_steps == 0 and state.step < state.total_steps:
                path = save_checkpoint(run.checkpoint_dir, model, optimizer, scheduler, state, hp.save_total_limit)
                events.emit("checkpoint", step=state.step, path=str(path))
    return "completed"
