"""The worker's contract on its own: a real `usf-bios worker` on loopback, fed by a local HTTP server that plays
the control plane's signed dataset URL. Auth on every route but /health, a submit idempotent on job_id, bad input
refused naming its field before anything starts, a bad dataset failing the job with its line, the size cap, the
SSRF guard, cancel, typed events after a sequence number, and the artifact tar with its sha256."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import chat_rows, write_jsonl
from tests.worker.conftest import Files, clean_env


def payload(job_id: str, dataset_url: str, **hp) -> dict:
    hyper = {"base_model": "test--tiny", "max_steps": 6, "learning_rate": 3e-3, "batch_size": 2,
             "gradient_accumulation_steps": 1, "max_seq_length": 128, "lora_r": 4, "lora_alpha": 8, "val_split": 0.1,
             "eval_steps": 3, "save_steps": 3, "precision": "fp32", "gradient_checkpointing": False, **hp}
    return {"job_id": job_id, "dataset_url": dataset_url, "hyperparameters": hyper,
            "gpu_config": {"gpu_type": "any", "num_gpus": 0}, "callback_url": None}


def wait_status(client, external: str, until, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = client.get(f"/training/status/{external}").json()
        if until(status):
            return status
        time.sleep(0.2)
    raise TimeoutError(status)


def ended(status: dict) -> bool:
    return status["status"] in ("completed", "failed", "cancelled")


def test_the_worker_refuses_to_start_without_its_key(tmp_path: Path):
    env = clean_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "usf_bios", "worker", "--port", "1"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "GPU_CLUSTER_API_KEY" in result.stdout + result.stderr


def test_every_route_but_health_needs_the_key(make_worker):
    worker = make_worker().start()
    with worker.client(key=None) as anonymous, worker.client(key="wrong-key") as wrong:
        assert anonymous.get("/health").json()["status"] == "ok"
        for client in (anonymous, wrong):
            assert client.post("/training/submit", json=payload("a", "http://127.0.0.1/x")).status_code == 401
            for path in ("/training/status/x", "/training/events/x", "/training/artifacts/x"):
                assert client.get(path).status_code == 401
            assert client.post("/training/cancel/x").status_code == 401


def test_a_job_runs_and_hands_back_its_events_and_artifact(make_worker, files, tmp_path: Path):
    worker = make_worker().start()
    Files.files["/chat.jsonl"] = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)).read_bytes()
    with worker.client() as client:
        first = client.post("/training/submit", json={**payload("job-1", files + "/chat.jsonl"), "report_to": ["tensorboard"]})
        assert first.status_code == 202, first.text
        external = first.json()["external_job_id"]
        again = client.post("/training/submit", json=payload("job-1", files + "/chat.jsonl"))
        assert again.status_code == 202 and again.json()["external_job_id"] == external
        status = wait_status(client, external, ended)
        assert status["status"] == "completed", status
        assert status["current_step"] == status["total_steps"] == 6 and status["progress"] == 1.0
        assert status["metrics"]["training_loss"] > 0 and status["metrics"]["learning_rate"] is not None
        assert status["started_at"] and status["finished_at"] and status["error"] is None

        page = client.get(f"/training/events/{external}", params={"after": 0}).json()
        types = [item["event"]["type"] for item in page["events"]]
        assert types[-1] == "done" and types.count("metric") == 6 and "stage" in types
        seqs = [item["seq"] for item in page["events"]]
        assert seqs == sorted(seqs) and page["next"] == seqs[-1]
        middle = seqs[3]
        rest = client.get(f"/training/events/{external}", params={"after": middle}).json()
        assert [item["seq"] for item in rest["events"]] == seqs[4:]
        assert client.get(f"/training/events/{external}", params={"after": page["next"]}).json()["events"] == []

        tar_answer = client.get(f"/training/artifacts/{external}")
        assert tar_answer.status_code == 200
        assert hashlib.sha256(tar_answer.content).hexdigest() == status["artifact"]["sha256"]
        assert len(tar_answer.content) == status["artifact"]["size_bytes"]
        names = tarfile.open(fileobj=io.BytesIO(tar_answer.content)).getnames()
        assert {"adapter_config.json", "adapter_model.safetensors", "training_log.json", "job.yaml"} <= set(names)
        # one job: the second submit started nothing
        assert len(list((worker.home / "data" / "output").iterdir())) == 1
        # report_to came with the submit: the worker's engine wrote the tensorboard event files
        assert list((worker.home / "data" / "logs" / f"{external}.tensorboard").rglob("events.out.tfevents.*"))


BAD_INPUT = [
    ({"hyperparameters": {"base_model": "test--tiny", "lora_r": 0}}, "hyperparameters.lora_r"),
    ({"hyperparameters": {"base_model": "nobody--nothing"}}, "hyperparameters.base_model"),
    ({"hyperparameters": {"base_model": "test--tiny", "learning_rate": "fast"}}, "hyperparameters.learning_rate"),
    ({"gpu_config": {"num_gpus": 1}}, "gpu_config.num_gpus"),
    ({"dataset_url": "http://169.254.169.254/latest/meta-data/"}, "dataset_url"),
    ({"dataset_url": "http://10.1.2.3/data.jsonl"}, "dataset_url"),
    ({"dataset_url": "file:///etc/passwd"}, "dataset_url"),
    ({"callback_url": "http://[::1]:9/cb"}, "callback_url"),
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"job_id": "../../etc"}, "job_id"),
    ({"report_to": ["wandb"]}, "report_to"),   # not configured on this worker (no WANDB_API_KEY)
]


def test_bad_input_is_refused_naming_its_field_and_starts_nothing(make_worker):
    worker = make_worker().start()
    with worker.client() as client:
        for change, field in BAD_INPUT:
            body = {**payload("bad", "http://127.0.0.1:9/x.jsonl"), **change}
            answer = client.post("/training/submit", json=body)
            assert answer.status_code == 422, (change, answer.text)
            assert field in {e["field"].removeprefix("body.") for e in answer.json()["errors"]}, (change, answer.json())
    assert not list((worker.home / "data" / "output").glob("*"))
    assert not list((worker.home / "data" / "datasets").glob("*"))


def fails_with(worker, files: str, job_id: str, path: str, needle: str) -> None:
    with worker.client() as client:
        answer = client.post("/training/submit", json=payload(job_id, files + path))
        assert answer.status_code == 202, answer.text
        status = wait_status(client, answer.json()["external_job_id"], ended, timeout=60)
    assert status["status"] == "failed" and needle in status["error"], status


def test_a_bad_dataset_fails_the_job_with_its_line_and_the_cap_holds(make_worker, files, tmp_path: Path):
    worker = make_worker(USF_MAX_UPLOAD_MB="1").start()
    good = write_jsonl(tmp_path / "chat.jsonl", chat_rows(5)).read_text().splitlines()
    Files.files["/broken.jsonl"] = ("\n".join(good[:2] + ['{"messages": [oops'] + good[2:]) + "\n").encode()
    fails_with(worker, files, "broken", "/broken.jsonl", "broken.jsonl:3: malformed JSON")
    Files.files["/huge.jsonl"] = b'{"text": "' + b"x" * (3 << 20) + b'"}\n'
    fails_with(worker, files, "huge", "/huge.jsonl", "limit")
    Files.redirects["/sneaky"] = "http://169.254.169.254/latest/meta-data/iam"
    fails_with(worker, files, "sneaky", "/sneaky", "169.254.169.254")
    check_a_failed_fetch_submitted_again_fetches_the_new_url(worker, files)
    left = [p for p in (worker.home / "data" / "datasets").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 1 << 20 for p in left), left   # nothing over the cap stayed on disk
    assert not list((worker.home / "data" / "output").glob("*"))


def check_a_failed_fetch_submitted_again_fetches_the_new_url(worker, files: str) -> None:
    """The same job_id again, after its fetch failed: the new submit's URLs are the ones used (a control plane
    resubmits with a fresh signed URL), checked by the SSRF guard as a first submit's are."""
    import sqlite3

    fails_with(worker, files, "again", "/gone.jsonl", "404")
    with worker.client() as client:
        refused = client.post("/training/submit", json=payload("again", "http://169.254.169.254/latest/meta-data/"))
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "dataset_url", refused.text
        fresh = {**payload("again", files + "/broken.jsonl"), "callback_url": files + "/callback"}
        answer = client.post("/training/submit", json=fresh)
        assert answer.status_code == 202, answer.text
        status = wait_status(client, answer.json()["external_job_id"], ended, timeout=60)
    assert status["status"] == "failed" and "broken.jsonl:3: malformed JSON" in status["error"], status
    with sqlite3.connect(worker.home / "data" / "usf.db") as db:
        urls = db.execute("SELECT dataset_url, callback_url FROM worker_submissions WHERE job_id = 'again'").fetchall()
    assert urls == [(files + "/broken.jsonl", files + "/callback")]


def test_cancel_stops_a_running_job_and_a_submit_again_resumes_it(make_worker, files, tmp_path: Path):
    """A submit again while the cancel is still saving its checkpoint is a 503 with Retry-After (it was taken as a
    duplicate and dropped, and the control plane's resume never ran); once cancelled, the same submit resumes it."""
    from tests.api.test_distributed_jobs import job_processes

    worker = make_worker().start()
    Files.files["/chat.jsonl"] = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)).read_bytes()
    body = payload("long", files + "/chat.jsonl", max_steps=200, save_steps=1000)
    with worker.client() as client:
        external = client.post("/training/submit", json=body).json()["external_job_id"]
        wait_status(client, external, lambda s: s["current_step"] >= 2 or ended(s))
        (engine,) = job_processes(external)["single"]
        os.kill(engine, signal.SIGSTOP)   # the cancel's SIGTERM waits: the job stays cancelling
        try:
            assert client.post(f"/training/cancel/{external}").status_code == 200
            early = client.post("/training/submit", json=body)
            assert early.status_code == 503 and early.headers["retry-after"] == "2", early.text
            assert "still stopping" in early.json()["detail"]
        finally:
            os.kill(engine, signal.SIGCONT)
        status = wait_status(client, external, ended, timeout=60)
        assert status["status"] == "cancelled"
        stopped_at = status["current_step"]
        assert client.get(f"/training/artifacts/{external}").status_code == 409
        assert client.get("/training/status/nobody").status_code == 404

        again = client.post("/training/submit", json=body)
        assert again.status_code == 202 and again.json()["external_job_id"] == external
        status = wait_status(client, external, lambda s: s["status"] in ("completed", "failed"))
        assert status["status"] == "completed" and status["current_step"] == 200 > stopped_at, status
    log = next((worker.home / "data" / "logs").glob("*.log")).read_text()
    assert f"resuming from checkpoint-{stopped_at}" in log


def test_the_artifact_download_is_cut_off_at_its_cap(files, tmp_path: Path):
    """The control plane's side: a worker's artifact over USF_MAX_ARTIFACT_MB is cut off, not written whole."""
    import httpx

    from usf_bios.control.executors.transports import RemoteRefused, WorkerTransport

    Files.files["/training/artifacts/big"] = b"x" * (3 << 20)
    dest = tmp_path / "big.tar"
    with httpx.Client(base_url=files) as client:
        with pytest.raises(RemoteRefused, match="USF_MAX_ARTIFACT_MB"):
            WorkerTransport(client, max_artifact_bytes=1 << 20).fetch_artifact("big", "job", dest)
        Files.files["/training/artifacts/small"] = b"y" * 1000
        digest = WorkerTransport(client, max_artifact_bytes=1 << 20).fetch_artifact("small", "job", dest)
    assert digest == hashlib.sha256(b"y" * 1000).hexdigest()


def test_only_runpod_hosts_are_spoken_to_as_runpod():
    from usf_bios.control.executors.transports import is_runpod_url

    assert is_runpod_url("https://api.runpod.ai/v2/abc") and is_runpod_url("https://runpod.ai/v2/abc")
    for url in ("https://evilrunpod.ai/v2/abc", "https://api.runpod.ai.evil.com/v2", "http://gpu-host:8001"):
        assert not is_runpod_url(url), url


def test_report_to_goes_with_the_submit():
    from usf_bios.spec import parse_spec
    from usf_bios.worker.contract import SubmitRequest, submit_payload, submit_spec

    spec = parse_spec({"name": "j", "base_model": "test--tiny", "dataset": "d", "report_to": ["tensorboard", "mlflow"]},
                      source="test")
    sent = SubmitRequest.model_validate(submit_payload("j", "http://127.0.0.1/d", spec, None))
    assert submit_spec(sent).report_to == ["tensorboard", "mlflow"]


def engine_pids(home: Path) -> list[int]:
    """The engine processes of this storage root (as tests.api.conftest.kill_engines finds them)."""
    marker, pids = f"USF_HOME={home}".encode(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"usf_bios.engine.run" in (proc / "cmdline").read_bytes() and \
                    marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_while_its_engine_trains_follows_it_again(make_worker, files, tmp_path: Path):
    """SIGKILL of the worker alone: its engine trains on, the restarted worker follows that engine again (no
    resume), and the job completes with each step's point once."""
    import signal

    worker = make_worker().start()
    Files.files["/chat.jsonl"] = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)).read_bytes()
    steps = 100
    with worker.client() as client:
        body = payload("survivor", files + "/chat.jsonl", max_steps=steps, eval_steps=50, save_steps=50)
        external = client.post("/training/submit", json=body).json()["external_job_id"]
        wait_status(client, external, lambda s: s["current_step"] >= 2 or ended(s))
    worker.stop(signal.SIGKILL)
    assert engine_pids(worker.home), "the engine did not outlive its worker"
    worker.start()
    assert engine_pids(worker.home), "the engine ended before the worker was back: nothing to follow live"
    with worker.client() as client:
        status = wait_status(client, external, ended)
        page = client.get(f"/training/events/{external}", params={"after": 0}).json()
    assert status["status"] == "completed" and status["current_step"] == steps, status
    metric_steps = [e["event"]["step"] for e in page["events"] if e["event"]["type"] == "metric"]
    assert metric_steps == list(range(1, steps + 1))
    log = next((worker.home / "data" / "logs").glob(f"{external}*.log")).read_text()
    assert "resuming from checkpoint-" not in log   # followed, not restarted
