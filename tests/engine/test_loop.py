"""The training loop's step bookkeeping: each step's numbers are read one step late (the GPU never waits for the
host at a step's end), yet reported in order, timed end to end, and never checkpointed when the loss diverged."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import event_dicts
from usf_bios.bench.configs import build_config, get_config
from usf_bios.bench.ours import bench_spec
from usf_bios.bench.synthetic import synthetic_examples
from usf_bios.engine.checkpoint import TrainerState, list_checkpoints
from usf_bios.engine.data import TrainingData
from usf_bios.engine.events import EventLog
from usf_bios.engine.loop import TrainingRun, make_optimizer, train
from usf_bios.engine.model import Placement, build_model
from usf_bios.engine.plan import resolve_plan
from usf_bios.spec import Performance


def tiny_run(tmp_path: Path, *, steps: int, save_steps: int, after_step=None) -> TrainingRun:
    """The engine's own setup on a tiny random Llama: packed synthetic rows, 2 per step, on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_config("tiny-llama-lora-fp32-256")
    base = AutoModelForCausalLM.from_config(build_config(cfg.model))
    examples = synthetic_examples(64, cfg.seq_len, base.config.vocab_size, cfg.seed)
    spec = bench_spec(cfg, max_steps=steps, accumulation=2, max_seq_length=cfg.seq_len, performance=Performance())
    hp = spec.hyperparameters.model_copy(update={"save_steps": save_steps, "learning_rate": 1e-3})
    placement = Placement(torch.device("cpu"), "fp32")
    plan = resolve_plan(spec.performance, hp, placement)
    model, plan, _ = build_model(base, spec, plan, placement)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], hp, plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    data = TrainingData(examples, batch_size=1, max_seq_length=cfg.seq_len, packing=True, val_split=0.0, seed=0,
                        pad_id=0)
    events = EventLog(tmp_path / "events.jsonl", tmp_path / "train.log")
    return TrainingRun(model, optimizer, scheduler, data, placement, hp, TrainerState(total_steps=steps), events,
                       tmp_path / "checkpoints", should_stop=lambda: False, plan=plan, after_step=after_step)


def test_every_step_is_reported_in_order_and_the_step_times_add_up_to_the_run(tmp_path):
    seen_by_hook: list[tuple[int, int]] = []   # (step the hook is called with, metrics on disk by then)
    run = tiny_run(tmp_path, steps=6, save_steps=4,
                   after_step=lambda step: seen_by_hook.append((step, len(metrics_so_far(run)))))
    started = time.perf_counter()
    assert train(run) == "completed"
    wall = time.perf_counter() - started
    run.events.close()
    events = event_dicts(tmp_path / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metric"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 and m["step_seconds"] > 0 for m in metrics)
    assert sum(m["step_seconds"] for m in metrics) == pytest.approx(wall, rel=0.2)
    for m in metrics:  # step_seconds is rounded to 0.1 ms, tokens_per_second to 0.1 token
        assert m["tokens"] / (m["step_seconds"] + 5e-5) - 0.1 <= m["tokens_per_second"] \
            <= m["tokens"] / max(m["step_seconds"] - 5e-5, 1e-9) + 0.1
    # a step is reported once the next one is queued: when the hook sees step 3, steps 1 and 2 are on disk
    assert seen_by_hook[:3] == [(1, 0), (2, 1), (3, 2)]
    # the checkpoint at step 4 comes after step 4's own metric
    kinds = [(e["type"], e.get("step")) for e in events if e["type"] in ("metric", "checkpoint")]
    assert kinds.index(("checkpoint", 4)) == kinds.index(("metric", 4)) + 1
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-4"]


def metrics_so_far(run: TrainingRun) -> list[dict]:
    return [e for e in event_dicts(run.events.events_path) if e["type"] == "metric"]   # the file is line-buffered


def test_a_diverged_step_fails_the_run_before_its_checkpoint_and_keeps_the_events_json(tmp_path):
    def diverge(step: int) -> None:
        if step == 1:  # as if the update of step 1 had blown up the adapter: step 2's loss is not finite
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).fill_(float("nan"))

    run = tiny_run(tmp_path, steps=4, save_steps=2, after_step=diverge)
    with pytest.raises(FloatingPointError, match="the loss became nan at step 2"):
        train(run)
    run.events.close()
    metrics = [e for e in event_dicts(tmp_path / "events.jsonl") if e["type"] == "metric"]
    assert [m["step"] for m in metrics] == [1]
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert "step 2/4 loss nan" in (tmp_path / "train.log").read_text()
