"""Jobs of several ranks through the control plane: a real server starts `num_processes: 2` CPU jobs under torchrun
(gloo). Two ranks train what one process trains on the same global batch; a rank killed mid-job interrupts the job,
which resumes from its checkpoint to the losses of the run nobody killed; a restarted server follows a running
torchrun job again, and its cancel leaves no rank behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl

DIST_TIMEOUT_S = 20


def job_processes(job_id: str) -> dict[str, list[int]]:
    """The live processes of a job: 'launcher' (torchrun) and each rank by its RANK ('0', '1', …)."""
    found: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"usf_bios.engine.run" not in cmd or job_id.encode() not in cmd or state == "Z":
            continue
        if b"torch.distributed.run" in cmd:
            key = "launcher"
        else:
            key = next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), "single")
        found.setdefault(key, []).append(int(proc.name))
    return found


def two_ranks(spec: dict) -> dict:
    return {**spec, "gpu_config": {"num_gpus": 0, "num_processes": 2}}


def losses(client, job_id: str) -> list[float]:
    return [p["loss"] for p in client.get(f"/jobs/{job_id}/metrics").json()]


def _gone_soon(job_id: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while job_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    return job_processes(job_id) == {}


def kill_rank_after_checkpoint(events: Path, job_id: str, rank: str) -> float:
    """SIGKILL one rank of the job once its first checkpoint is written; the seconds torchrun took to end."""
    deadline = time.monotonic() + 240
    while not (events.is_file() and '"checkpoint"' in events.read_text()):
        assert time.monotonic() < deadline, "the job never wrote a checkpoint"
        time.sleep(0.02)
    processes = job_processes(job_id)
    assert len(processes.get("launcher", [])) == 1 and set(processes) >= {"0", "1"}, processes
    os.kill(processes[rank][0], signal.SIGKILL)
    killed_at = time.monotonic()
    while job_processes(job_id).get("launcher") == processes["launcher"]:
        assert time.monotonic() - killed_at < DIST_TIMEOUT_S, "torchrun did not tear the job down in time"
        time.sleep(0.05)
    return time.monotonic() - killed_at


def test_two_rank_jobs_train_like_one_process_resume_after_a_lost_rank_and_cancel_every_rank(make_server, tmp_path):
    """One server, three CPU jobs side by side: ``single`` (one process, gradient_accumulation_steps 2), ``killed``
    (two ranks of 1: the same global batch; rank 1 SIGKILLed after its first checkpoint, so it runs twice, and
    its 16 losses — 3 of the first attempt, 13 of the resumed one — must be the single process's) and ``long``
    (two ranks, followed again by a restarted server, then cancelled)."""
    first = make_server(USF_MAX_CPU_JOBS="3", USF_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S)).start()
    with first.client() as client:
        register_model(client, "tiny", tiny_model_in(first.home, hidden=32, layers=2))
        upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(60)), name="chat")
        spec = job_spec("tiny", "chat", max_steps=16, save_steps=3, eval_steps=8, lora_dropout=0.0, max_seq_length=96)
        single = submit(client, {**spec, "name": "single", "hyperparameters": {**spec["hyperparameters"],
                                                                                "gradient_accumulation_steps": 2}})
        killed = submit(client, {**two_ranks(spec), "name": "killed"})

        events = first.home / "data" / "logs" / f"{killed['id']}.events.jsonl"
        torn_down = kill_rank_after_checkpoint(events, killed["id"], "1")
        print(f"torchrun ended the job {torn_down:.1f} s after the SIGKILL of rank 1")
        done = {job["id"]: wait_for(client, job["id"], final, timeout=300) for job in (single, killed)}
        assert [j["status"] for j in done.values()] == ["completed"] * 2, done
        assert done[killed["id"]]["attempts"] == 2     # interrupted once, resumed by the scheduler
        one, two = losses(client, single["id"]), losses(client, killed["id"])
        assert len(one) == len(two) == 16
        assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
        log = client.get(f"/jobs/{killed['id']}/logs").text
        assert "rank 0 of 2 (DistributedDataParallel, gloo)" in log and "resuming from checkpoint-" in log
        assert "another rank of the job was lost" in log and "the job is interrupted" in log
        assert _gone_soon(killed["id"]) and _gone_soon(single["id"])
        # submitted only now: its two ranks would train all along and slow the others down (2 cores)
        endless = {**spec["hyperparameters"], "max_steps": 5000, "save_steps": 5000, "eval_steps": 5000}
        long = submit(client, {**two_ranks(spec), "name": "long", "hyperparameters": endless})
        wait_for(client, long["id"], lambda j: j["current_step"] >= 3, timeout=120)

    first.stop(signal.SIGKILL)
    processes = job_processes(long["id"])
    assert set(processes) == {"launcher", "0", "1"}, processes   # the job outlives its server
    second = make_server(USF_MAX_CPU_JOBS="3", USF_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S))
    second.port = first.port
    second.start()
    with second.client() as client:
        step = client.get(f"/jobs/{long['id']}").json()["current_step"]
        followed = wait_for(client, long["id"], lambda j: j["current_step"] > step + 2, timeout=60)
        assert followed["status"] == "running" and followed["attempts"] == 1, followed
        assert job_processes(long["id"]) == processes          # the same torchrun and ranks, nothing started again
        assert client.post(f"/jobs/{long['id']}/cancel").status_code == 200
        cancelled = wait_for(client, long["id"], final, timeout=60)
        assert cancelled["status"] == "cancelled", cancelled
        [checkpoint] = client.get(f"/jobs/{long['id']}/checkpoints").json()
        assert checkpoint["step"] >= followed["current_step"]
    assert _gone_soon(long["id"]), job_processes(long["id"])
