"""Checkpoints and exact resume: a SIGKILL between checkpoints loses nothing that matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.engine.checkpoint import list_checkpoints, read_state
from usf_bios.engine.events import read_events, training_log
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.run import JobAlreadyRunning, run_job
from usf_bios.spec import parse_spec
from usf_bios.storage import StorageLayout


def spec_dict(model: str, dataset: Path, **hp) -> dict:
    hyper = dict(max_steps=12, learning_rate=3e-3, batch_size=2, gradient_accumulation_steps=1, max_seq_length=256,
                 lora_r=4, lora_alpha=8, lora_dropout=0.1, val_split=0.1, eval_steps=4, save_steps=4,
                 save_total_limit=2, precision="fp32", warmup_ratio=0.1, gradient_checkpointing=False)
    hyper.update(hp)
    return {"name": "resume-test", "base_model": model, "dataset": str(dataset), "hyperparameters": hyper,
            "gpu_config": {"num_gpus": 0}}


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "usf_bios", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def losses(layout: StorageLayout, job_id: str) -> dict[int, float]:
    return {p["step"]: p["loss"] for p in training_log(read_events(layout.job_events(job_id))[0])}


def wait_for_step(layout: StorageLayout, job_id: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["type"] == "metric" and e["step"] >= step for e in event_dicts(layout.job_events(job_id))):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise TimeoutError(f"step {step} never came")


def reference_losses(layout: StorageLayout, spec: dict) -> dict[int, float]:
    job = create_job(parse_spec({**spec, "name": "reference"}), layout)
    assert run_job(job, layout).status == "completed"
    return losses(layout, job)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted_run(layout, tiny_model, tmp_path, accumulation):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))
    spec = spec_dict(tiny_model, dataset, gradient_accumulation_steps=accumulation)
    expected = reference_losses(layout, spec)
    assert sorted(expected) == list(range(1, 13))

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    proc = cli("train", str(spec_file), "--quiet")
    job_id = proc.stdout.readline().split()[1]
    wait_for_step(layout, job_id, 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen = max(e["step"] for e in event_dicts(layout.job_events(job_id)) if e["type"] == "metric")
    newest = read_state(list_checkpoints(layout.job_checkpoints(job_id))[-1]).step
    assert newest < seen < 12, "the kill should land after a checkpoint and before the next one"

    resumed = cli("train", str(spec_file), "--resume", job_id, "--quiet")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    got = losses(layout, job_id)
    assert sorted(got) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    log = json.loads((layout.job_output(job_id) / "training_log.json").read_text())
    assert [p["step"] for p in log] == list(range(1, 13))
    assert [p["loss"] for p in log] == [got[s] for s in range(1, 13)]


def test_resume_refuses_a_changed_spec_or_dataset(layout, tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    spec = spec_dict(tiny_model, dataset, max_steps=6, save_steps=3)
    job_id = create_job(parse_spec(spec), layout)
    assert run_job(job_id, layout).status == "completed"

    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**spec, "hyperparameters": {**spec["hyperparameters"], "learning_rate": 0.01}}))
    proc = cli("train", str(changed), "--resume", job_id)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "hyperparameters.learning_rate: 0.003 → 0.01" in " ".join(err.split())

    write_jsonl(dataset, chat_rows(31))  # same path, other content
    result = run_job(job_id, layout)
    assert result.status == "failed"
    assert "the dataset changed since checkpoint-3" in result.error


def test_sigterm_saves_a_checkpoint_and_ends_cancelled(layout, tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(tiny_model, dataset, max_steps=10_000, save_steps=10_000)))
    proc = cli("train", str(spec_file), "--quiet")
    job_id = proc.stdout.readline().split()[1]
    wait_for_step(layout, job_id, 3, proc)
    with pytest.raises(JobAlreadyRunning):  # one engine process per job
        run_job(job_id, layout)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 3
    events = event_dicts(layout.job_events(job_id))
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    last_step = max(e["step"] for e in events if e["type"] == "metric")
    checkpoints = list_checkpoints(layout.job_checkpoints(job_id))
    assert [read_state(c).step for c in checkpoints] == [last_step]
    assert (checkpoints[0] / "adapter_model.safetensors").is_file() and (checkpoints[0] / "optimizer.pt").is_file()


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(layout, tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    job_id = create_job(parse_spec(spec_dict(tiny_model, dataset, max_steps=8, save_steps=2, save_total_limit=2)), layout)
    assert run_job(job_id, layout).status == "completed"
    folder = layout.job_checkpoints(job_id)
    assert [c.name for c in list_checkpoints(folder)] == ["checkpoint-4", "checkpoint-6"]  # limit 2; none at the end
    # what a kill during the save of step 8 leaves behind: a temporary folder without trainer_state.json
    partial = folder / ".checkpoint-8.tmp"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"torn")
    assert list_checkpoints(folder)[-1].name == "checkpoint-6"
    state = read_state(list_checkpoints(folder)[-1])
    assert (state.step, state.total_steps) == (6, 8)
