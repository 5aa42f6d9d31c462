"""DistributedDataParallel under torchrun, on the CPU with the gloo backend: two ranks train what one process
trains on the same global batch — the same per-step losses (to 1e-5) and the same adapter (to 1e-6); only rank 0
writes events, checkpoints and the output; a resume on another number of ranks is refused with a message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.engine.jobdir import create_job
from usf_bios.spec import JobSpec
from usf_bios.storage import StorageLayout

STEPS = 5


def job(layout: StorageLayout, model: str, dataset: Path, name: str, accumulation: int, gpu: dict | None = None,
        **hp) -> str:
    spec = JobSpec.model_validate({
        "name": name, "base_model": model, "dataset": str(dataset), "gpu_config": {"num_gpus": 0, **(gpu or {})},
        "hyperparameters": {"max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": accumulation,
                            "max_seq_length": 96, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                            "learning_rate": 3e-3, "precision": "fp32", "gradient_checkpointing": False,
                            "val_split": 0.1, "eval_steps": 2, "save_steps": 2, **hp}})
    return create_job(spec, layout)


def run(job_id: str, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "USF_DIST_TIMEOUT_S": "120"}
    engine = ["-m", "usf_bios.engine.run", job_id]
    command = [sys.executable, *engine] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *engine]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def losses(layout: StorageLayout, job_id: str) -> list[float]:
    return [e["loss"] for e in event_dicts(layout.job_events(job_id)) if e["type"] == "metric"]


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains_on_the_same_global_batch(layout, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    single = job(layout, tiny_model, data, "single", accumulation=4)
    double = job(layout, tiny_model, data, "double", accumulation=2)   # 2 ranks × 2 = the same 4 micro-batches
    for job_id, ranks in ((single, 1), (double, 2)):
        done = run(job_id, ranks)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = losses(layout, single), losses(layout, double)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    evals = [[e["validation_loss"] for e in event_dicts(layout.job_events(j)) if e["type"] == "eval"] for j in (single, double)]
    assert evals[0] and max(abs(a - b) for a, b in zip(*evals)) < 1e-5
    a = load_file(layout.job_output(single) / "adapter_model.safetensors")
    b = load_file(layout.job_output(double) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    log = layout.job_log(double).read_text()
    assert "rank 0 of 2 (DistributedDataParallel, gloo)" in log
    # rank 1 wrote only its own log and events; the job's checkpoints and output are rank 0's, once
    assert (layout.logs / f"{double}.rank1.log").is_file()
    assert sorted(p.name for p in layout.job_checkpoints(double).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    import json

    state = layout.job_checkpoints(double) / "checkpoint-4" / "trainer_state.json"
    assert json.loads(state.read_text())["world_size"] == 2


def test_a_resume_on_another_number_of_ranks_is_refused(layout, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    job_id = job(layout, tiny_model, data, "resumed", accumulation=1, max_steps=3)
    first = run(job_id, 2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    checkpoint = layout.job_checkpoints(job_id) / "checkpoint-2"
    assert checkpoint.is_dir()
    again = run(job_id, 1)   # continues from checkpoint-2, on one process
    assert again.returncode == 1
    done = [e for e in event_dicts(layout.job_events(job_id)) if e["type"] == "done"][-1]
    assert done["status"] == "failed" and "saved by a job on 2 rank(s); this run has 1" in done["error"], done


def test_fsdp2_two_ranks_train_and_save_what_one_process_does_across_a_cancel_and_resume(layout, tiny_model, tmp_path):
    """FSDP2 (every parameter sharded over 2 gloo ranks, the adapter gathered onto rank 0 for each save): stopped
    (SIGTERM to torchrun) after its first step and resumed, it still gives the losses (1e-5) and the adapter (1e-6)
    of one process with the same global batch."""
    import signal
    import time

    from usf_bios.engine.run import run_job

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    single = job(layout, tiny_model, data, "single", accumulation=4)
    sharded = job(layout, tiny_model, data, "sharded", accumulation=2, save_steps=100,
                  gpu={"num_processes": 2, "strategy": "fsdp"})
    assert run_job(single, layout).status == "completed"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "USF_DIST_TIMEOUT_S": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "usf_bios.engine.run", sharded]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (layout.job_events(sharded).is_file() and '"metric"' in layout.job_events(sharded).read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:] if first.stdout else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)   # torchrun passes it to both ranks: they stop at one step, rank 0 saves
    first.communicate(timeout=120)
    stopped = [e for e in event_dicts(layout.job_events(sharded)) if e["type"] == "done"]
    assert stopped and stopped[-1]["status"] == "cancelled", stopped
    again = run(sharded, 2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    log = layout.job_log(sharded).read_text()
    assert "rank 0 of 2 (FSDP2, gloo)" in log and "strategy fsdp, as the spec asks" in log
    assert "resuming from checkpoint-" in log
    by_step = {e["step"]: e["loss"] for e in event_dicts(layout.job_events(sharded)) if e["type"] == "metric"}
    one = losses(layout, single)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert max(abs(a - by_step[i + 1]) for i, a in enumerate(one)) < 1e-5, (one, by_step)
    a = load_file(layout.job_output(single) / "adapter_model.safetensors")
    b = load_file(layout.job_output(sharded) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_a_lost_peer_interrupts_but_a_failure_a_peer_recorded_fails_the_job(layout):
    """The gloo error of a collective whose peer died counts as a lost rank (the job is interrupted and resumed);
    a failure another rank wrote into its own events since this run began is rank 0's verdict instead."""
    import time

    from usf_bios.engine.distributed import World, peer_lost
    from usf_bios.engine.events import EventLog
    from usf_bios.engine.run import peer_failure
    from usf_bios.status import JobStatus

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    assert peer_lost(gloo, World(size=2)) and not peer_lost(gloo, World()) and not peer_lost(ValueError("x"), World(2))
    started = time.time()
    assert peer_failure("j", layout, World(size=2), started) is None
    rank1 = EventLog(layout.logs / "j.rank1.events.jsonl", layout.logs / "j.rank1.log")
    rank1.done(JobStatus.FAILED, error="CUDA out of memory")
    rank1.close()
    assert peer_failure("j", layout, World(size=2), started) == "rank 1: CUDA out of memory"
    assert peer_failure("j", layout, World(size=2), time.time() + 1) is None   # an earlier attempt's failure


def test_fsdp_with_8bit_weights_is_refused_and_auto_keeps_them_whole():
    from usf_bios.engine.distributed import choose_strategy
    from usf_bios.engine.model import device_problems

    def spec(**gpu) -> JobSpec:
        return JobSpec.model_validate({"name": "s", "base_model": "m", "dataset": "d", "gpu_config": gpu,
                                       "hyperparameters": {"quantization": "8bit"}})

    assert ("gpu_config.strategy" in [f for f, _ in device_problems(spec(num_gpus=2, strategy="fsdp"))])
    assert device_problems(spec(num_gpus=2)) == []
    strategy, why = choose_strategy(spec(num_gpus=2), 2, {}, 8_000_000_000, 80 * 2**30)
    assert strategy == "ddp" and "8-bit" in why
    assert choose_strategy(spec(num_gpus=1), 1, {}, None, None)[0] == "single"
