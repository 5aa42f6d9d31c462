"""One view of the jobs: what `usf-bios train` ran is adopted by a real server (finished, interrupted, still
running), the model folders are registered at start, and the `usf-bios jobs` / `submit` client drives it all."""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tests.api.flows import final, tiny_model_in, wait_for
from tests.conftest import chat_rows, write_jsonl


def write_spec(home: Path, tmp_path: Path, name: str, **hp: object) -> Path:
    data = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows(24))
    hyper = {"max_steps": 8, "learning_rate": 3e-3, "batch_size": 2, "gradient_accumulation_steps": 1,
             "max_seq_length": 96, "lora_r": 4, "lora_alpha": 8, "val_split": 0.1, "eval_steps": 4, "save_steps": 4,
             "precision": "fp32", "gradient_checkpointing": False, **hp}
    lines = [f"name: {name}", "base_model: test--tiny", f"dataset: {data}", "gpu_config: {num_gpus: 0}",
             "hyperparameters:", *[f"  {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in hyper.items()]]
    spec = tmp_path / f"{name}.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def client_env(server) -> dict[str, str]:
    return {**server.env, "USF_SERVER_URL": server.url, "COLUMNS": "250"}


def usf(server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_bios", *args], env=client_env(server), capture_output=True,
                          text=True, timeout=timeout)


def job_id_of(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("job "))


def test_a_finished_cli_job_and_the_demo_model_are_there_when_the_server_starts(make_server, tiny_model_template,
                                                                                  tmp_path):
    server = make_server()
    tiny_model_in(server.home, tiny_model_template)
    trained = server.cli("train", str(write_spec(server.home, tmp_path, "offline")), "--quiet")
    assert trained.returncode == 0, trained.stderr
    job_id = job_id_of(trained.stdout)
    server.start()
    client = server.client()

    assert [m["name"] for m in client.get("/models").json()] == ["test--tiny"]   # scanned at start
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["current_step"] == 8 and job["total_steps"] == 8, job
    assert job["artifact"] == {"name": "offline", "version": 1} and job["metrics"]["loss"] is not None
    assert job["model_id"] == client.get("/models/test--tiny").json()["id"]
    assert [p["step"] for p in client.get(f"/jobs/{job_id}/metrics").json()] == list(range(1, 9))
    assert [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()] == [4]

    listed = usf(server, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "completed" in row and "8/8" in row and "1 job(s)" in listed.stdout
    shown = usf(server, "jobs", "show", job_id)
    assert shown.returncode == 0 and "completed" in shown.stdout and "offline v1" in shown.stdout, shown.stdout
    logs = usf(server, "jobs", "logs", job_id, "--tail", "3")
    assert logs.returncode == 0 and logs.stdout.splitlines()[-1].endswith("done: completed"), logs.stdout
    target = tmp_path / "adapter.tar"
    fetched = usf(server, "jobs", "download", job_id, "-o", str(target))
    assert fetched.returncode == 0, fetched.stderr
    with tarfile.open(target) as tar:
        assert f"{job_id}/adapter_model.safetensors" in tar.getnames()

    refused = usf(server, "jobs", "resume", job_id)   # history is read-only: a completed job stays completed
    assert refused.returncode == 2 and "is completed; it cannot become queued" in " ".join(refused.stderr.split())
    missing = usf(server, "jobs", "show", "no-such-job")
    assert missing.returncode == 2 and "404" in missing.stderr and "no-such-job" in missing.stderr

    restarted = make_server()   # a second start adopts nothing twice
    server.stop()
    restarted.start()
    assert restarted.client().get("/jobs").json()["total"] == 1
    assert len(restarted.client().get("/models").json()) == 1


def test_an_interrupted_cli_job_is_adopted_and_resumed_through_the_client(make_server, tiny_model_template, tmp_path):
    server = make_server()
    tiny_model_in(server.home, tiny_model_template)
    spec = write_spec(server.home, tmp_path, "killed", max_steps=30, save_steps=5)
    proc = subprocess.Popen([sys.executable, "-m", "usf_bios", "train", str(spec), "--quiet"], env=server.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = server.home / "data" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    job_id = next(checkpoints.iterdir()).name

    server.start()
    job = server.client().get(f"/jobs/{job_id}").json()
    assert job["status"] == "interrupted" and "continues from checkpoint-" in job["error"], job
    assert job["model_id"] is not None and job["current_step"] >= 5

    resumed = usf(server, "jobs", "resume", job_id, "--follow")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "step 30/30" in resumed.stdout and "completed" in resumed.stdout
    points = server.client().get(f"/jobs/{job_id}/metrics").json()
    assert [p["step"] for p in points] == list(range(1, 31))
    log = (server.home / "data" / "logs" / f"{job_id}.log").read_text()
    assert "resuming from checkpoint-" in log


def test_a_running_cli_job_is_followed_and_cancelled_through_the_server(make_server, tiny_model_template, tmp_path):
    server = make_server(USF_CANCEL_GRACE_S="60").start()
    tiny_model_in(server.home, tiny_model_template)
    spec = write_spec(server.home, tmp_path, "long", max_steps=100_000, save_steps=50, eval_steps=1000)
    # in the test's own process group, as a shell would start it: not a group leader, so the cancel's SIGTERM goes
    # to the process itself
    proc = subprocess.Popen([sys.executable, "-m", "usf_bios", "train", str(spec), "--quiet"], env=server.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        output = server.home / "data" / "output"
        deadline = time.monotonic() + 120
        while not (output.is_dir() and any(output.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        job_id = next(output.iterdir()).name
        client = server.client()
        while client.get(f"/jobs/{job_id}").status_code == 404:   # adopted within the scheduler's 10 s
            assert time.monotonic() < deadline, "never adopted"
            time.sleep(0.2)
        job = wait_for(client, job_id, lambda j: j["current_step"] > 0, timeout=120)
        assert job["status"] == "running" and job["attempts"] == 1, job

        cancelled = usf(server, "jobs", "cancel", job_id)
        assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled.stderr
        followed = usf(server, "jobs", "show", job_id, "--follow")
        assert followed.returncode == 3, followed.stdout + followed.stderr   # cancelled
        assert proc.wait(timeout=60) == 3
        job = wait_for(client, job_id, final)
        assert job["status"] == "cancelled" and job["current_step"] >= 1
        assert client.get(f"/jobs/{job_id}/checkpoints").json(), "the engine checkpoints when it is cancelled"
    finally:
        if proc.poll() is None:
            proc.kill()
