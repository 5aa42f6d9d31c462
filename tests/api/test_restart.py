"""Restart recovery: SIGKILL the server while two jobs run; one engine keeps running, one is lost too.
The new server follows the first again and resumes the second from its checkpoint; both complete with
one point per step, and no job or process is duplicated."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl

STEPS = 150


def engine_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"usf_bios.engine.run" in cmd and job_id.encode() in cmd and state != "Z":
                pids.append(int(proc.name))
    return pids


def test_server_sigkill_with_two_running_jobs(make_server, tmp_path):
    first = make_server(USF_MAX_CPU_JOBS="2").start()
    with first.client() as client:
        register_model(client, "tiny", tiny_model_in(first.home, hidden=48, layers=2))
        upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(60)), name="chat")
        spec = job_spec("tiny", "chat", max_steps=STEPS, save_steps=20, eval_steps=100, lora_dropout=0.1)
        kept, lost = submit(client, {**spec, "name": "kept"}), submit(client, {**spec, "name": "lost"})
        for job in (kept, lost):
            wait_for(client, job["id"], lambda j: j["current_step"] >= 25)

    first.stop(signal.SIGKILL)
    [lost_pid] = engine_pids(lost["id"])
    os.killpg(lost_pid, signal.SIGKILL)  # this one's process dies with the server
    [kept_pid] = engine_pids(kept["id"])
    os.kill(kept_pid, signal.SIGSTOP)    # paused while no server runs, so it is still running when the next one looks

    second = make_server(USF_MAX_CPU_JOBS="2")
    second.port = first.port
    second.start()
    with second.client() as client:
        # the kept engine is followed again while it still runs; the lost one is started again, once
        time.sleep(1.0)                  # a few scheduler ticks (USF_POLL_INTERVAL_S is 0.2 s)
        followed = client.get(f"/jobs/{kept['id']}").json()
        assert followed["status"] == "running" and followed["attempts"] == 1, followed
        os.kill(kept_pid, signal.SIGCONT)
        wait_for(client, lost["id"], lambda j: j["attempts"] == 2 and j["status"] == "running", timeout=120)
        for job in (kept, lost):
            assert len(engine_pids(job["id"])) <= 1, "at most one engine per job"
        done = {job["id"]: wait_for(client, job["id"], final, timeout=600) for job in (kept, lost)}
        assert [j["status"] for j in done.values()] == ["completed", "completed"], done
        assert done[kept["id"]]["attempts"] == 1  # followed again, never restarted
        assert done[lost["id"]]["attempts"] == 2  # resumed from its checkpoint
        assert client.get("/jobs").json()["total"] == 2
        for job_id in done:
            log = json.loads((second.home / "data" / "output" / job_id / "training_log.json").read_text())
            assert [p["step"] for p in log] == list(range(1, STEPS + 1))
            points = client.get(f"/jobs/{job_id}/metrics").json()
            assert [p["step"] for p in points] == list(range(1, STEPS + 1))
            deadline = time.monotonic() + 30  # the engine exits right after its 'done' event
            while engine_pids(job_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert engine_pids(job_id) == []
