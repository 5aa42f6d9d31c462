"""Our side of the benchmark: the engine's own model setup and training loop on the benchmark's examples.

The same examples as the baseline, packed into rows of ``seq_len`` tokens (one row per micro-batch); the
accumulation is chosen so that an optimizer step trains about as many examples as the baseline's step.
Times and token counts come from the loop's own metric events, so what is measured is what a job runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from usf_bios.bench.configs import BenchConfig
from usf_bios.bench.measure import Measurement, summarize
from usf_bios.engine.checkpoint import TrainerState
from usf_bios.engine.data import Batch, TokenizedExample, TrainingData, collate
from usf_bios.engine.events import EventLog, MetricEvent, read_events
from usf_bios.engine.loop import TrainingRun, autocast, make_optimizer, train
from usf_bios.engine.loss import loss_sum
from usf_bios.engine.model import Placement, build_model
from usf_bios.engine.plan import resolve_plan
from usf_bios.spec import JobSpec, Performance


def bench_spec(cfg: BenchConfig, *, max_steps: int, accumulation: int, max_seq_length: int,
               performance: Performance) -> JobSpec:
    """The job spec our engine would get for this benchmark (LoRA r/alpha as the baseline, dropout 0)."""
    return JobSpec(name=cfg.name, base_model=cfg.model, dataset="synthetic", performance=performance,
                   hyperparameters={
                       "max_steps": max_steps, "learning_rate": cfg.learning_rate, "batch_size": 1,
                       "gradient_accumulation_steps": accumulation, "max_seq_length": max_seq_length,
                       "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0,
                       "quantization": cfg.quantization, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                       "packing": True, "val_split": 0.0, "eval_steps": 10_000_000, "save_steps": 10_000_000,
                       "precision": cfg.precision, "gradient_checkpointing": True, "seed": cfg.seed})


def _placement(model: Any, cfg: BenchConfig) -> Placement:
    return Placement(next(model.parameters()).device, cfg.precision)


def plan_rows(examples: list[TokenizedExample], cfg: BenchConfig) -> tuple[TrainingData, int, int]:
    """The packed rows our engine trains on (one row per micro-batch), rows per step and steps."""
    data = TrainingData(examples, batch_size=1, max_seq_length=cfg.seq_len, packing=True, val_split=0.0,
                        seed=cfg.seed, pad_id=0)
    rows = len(data.train_rows)
    accumulation = max(1, round(rows / cfg.steps))
    steps = rows // accumulation
    if steps <= cfg.warmup_steps:
        raise ValueError(f"{cfg.name}: {rows} packed rows make only {steps} steps; need more than "
                         f"{cfg.warmup_steps} warm-up steps")
    return data, accumulation, steps


def step_rows(examples: list[TokenizedExample], cfg: BenchConfig) -> list[list[Batch]]:
    """Our rows as each optimizer step takes them, one-row micro-batches in the loop's order (without merging):
    what a peer trains on to do the same work as our side."""
    data, accumulation, steps = plan_rows(examples[:cfg.num_examples], cfg)
    order = data.epoch_order(0)
    return [[data.micro_batch(order, k * accumulation + j) for j in range(accumulation)] for k in range(steps)]


def run_ours(model: Any, examples: list[TokenizedExample], cfg: BenchConfig, performance: Performance,
             workdir: Path, after_step: Callable[[int], None] | None = None) -> tuple[Measurement, list[str]]:
    """Train with the engine's loop; returns the measurement and the engine's notes (the speed plan it chose)."""
    examples = examples[:cfg.num_examples]
    data, accumulation, steps = plan_rows(examples, cfg)
    rows = len(data.train_rows)
    spec = bench_spec(cfg, max_steps=steps, accumulation=accumulation, max_seq_length=cfg.seq_len,
                      performance=performance)
    placement = _placement(model, cfg)
    plan = resolve_plan(spec.performance, spec.hyperparameters, placement)
    model, plan, notes = build_model(model, spec, plan, placement)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, spec.hyperparameters, plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    workdir.mkdir(parents=True, exist_ok=True)
    events = EventLog(workdir / "events.jsonl", workdir / "train.log")
    notes.append(f"{len(examples)} examples → {rows} rows of ≤ {cfg.seq_len} tokens; {accumulation} rows per step, "
                 f"{steps} steps")
    if placement.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run = TrainingRun(model, optimizer, scheduler, data, placement, spec.hyperparameters,
                      TrainerState(total_steps=steps), events, workdir / "checkpoints", should_stop=lambda: False,
                      plan=plan, after_step=after_step)
    try:
        train(run)
    finally:
        events.close()
    peak = torch.cuda.max_memory_allocated() / 1e9 if placement.device.type == "cuda" else 0.0
    metrics = [e for e in read_events(workdir / "events.jsonl")[0] if isinstance(e, MetricEvent)]
    seconds = [float(m.step_seconds or 0.0) for m in metrics]
    tokens = [int(m.tokens or 0) for m in metrics]
    return Measurement(tokens_per_second=summarize(seconds, tokens, cfg.warmup_steps), peak_memory_gb=peak,
                       step_seconds=seconds, step_tokens=tokens, losses=[m.loss for m in metrics]), notes


def longest_context(model: Any, cfg: BenchConfig, performance: Performance, *, start: int, limit: int,
                    resolution: int, held_bytes: int = 0, log: Any = print) -> dict[str, Any]:
    """The longest single example (batch 1) for which one full optimizer step runs, by doubling then bisection.

    One step = forward, backward and AdamW on the LoRA weights, through the engine's model setup and loss.
    Running out of GPU memory is the only failure that ends a trial; anything else is raised. ``held_bytes``:
    memory taken beforehand to stand for a smaller card, left out of the reported peaks.
    """
    spec = bench_spec(cfg, max_steps=1, accumulation=1, max_seq_length=limit, performance=performance)
    placement = _placement(model, cfg)
    plan = resolve_plan(spec.performance, spec.hyperparameters, placement)
    model, plan, notes = build_model(model, spec, plan, placement)
    for note in notes:
        log(note)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], spec.hyperparameters, plan)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    trials: list[dict[str, Any]] = []

    def fits(length: int) -> bool:
        ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        batch = collate([[TokenizedExample(ids, ids[1:] + [-100], False, 1)]], pad_id=0).to(placement.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started[0].record()
        try:
            with autocast(placement):
                loss = loss_sum(model, batch, loss=plan.loss, attention=plan.attention) / length
            loss.backward()
            optimizer.step()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        optimizer.zero_grad(set_to_none=True)
        started[1].record()
        torch.cuda.synchronize()
        trial = {"tokens": length, "fits": ok,
                 "peak_memory_gb": round((torch.cuda.max_memory_allocated() - held_bytes) / 1e9, 2),
                 "seconds": round(started[0].elapsed_time(started[1]) / 1000, 1)}
        trials.append(trial)
        log(f"context {length}: {'fits' if ok else 'out of memory'} (peak {trial['peak_memory_gb']} GB, "
            f"{trial['seconds']} s)")
        return ok

    low, high = 0, None
    length = start
    while length <= limit:
        if not fits(length):
            high = length
            break
        low, length = length, length * 2
    if high is None:
        high = limit + resolution
    while high - low > resolution:
        middle = (low + high) // 2 // resolution * resolution or resolution
        if middle in (low, high):
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"longest_tokens": low, "first_failure_tokens": high if high <= limit else None, "trials": trials,
            "plan": plan.describe()}
