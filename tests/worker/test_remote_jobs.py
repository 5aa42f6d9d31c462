"""A job submitted to the control plane trains on a remote worker: two real servers on loopback with separate
USF_HOMEs, the tiny model on the CPU. Its chart points arrive (through callbacks, or by polling when callbacks
cannot), the adapter lands in the control plane's output folder and plain peft loads it; a worker killed
mid-job finishes it from its checkpoint after a restart, without a step twice."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.api.flows import final, job_spec, submit, wait_for
from tests.worker.conftest import prepare

STEPS = 8


def remote_spec(model: str, dataset: str, steps: int = STEPS) -> dict:
    spec = job_spec(model, dataset, name="remote-job", max_steps=steps, save_steps=3, eval_steps=4)
    spec["gpu_config"]["executor"] = "remote"
    return spec


def check_finished(control, job: dict, steps: int = STEPS) -> None:
    assert job["status"] == "completed", job
    with control.client() as client:
        points = client.get(f"/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in points] == list(range(1, steps + 1))
    assert all(p["loss"] is not None and p["tokens"] for p in points)
    output = control.home / "data" / "output" / job["id"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_log.json", "README.md"):
        assert (output / name).is_file(), sorted(p.name for p in output.iterdir())
    log = json.loads((output / "training_log.json").read_text())
    assert [point["step"] for point in (log["points"] if isinstance(log, dict) else log)] == list(range(1, steps + 1))


def load_with_peft(control, job_id: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(control.home / "models" / "test--tiny", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, control.home / "data" / "output" / job_id)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def receipts(control) -> int:
    with sqlite3.connect(control.home / "data" / "usf.db") as db:
        return db.execute("SELECT count(*) FROM callback_receipts").fetchone()[0]


def test_a_job_trains_on_the_worker_and_its_adapter_comes_back(make_worker, make_control, tmp_path, tiny_template,
                                                               open_page):
    worker = make_worker().start()
    control = make_control(worker).start()
    model, dataset = prepare(control, tmp_path, tiny_template)
    with control.client() as client:
        job = submit(client, remote_spec(model, dataset))
        running = wait_for(client, job["id"], lambda j: j["current_step"] >= 1 or final(j), timeout=240)
        assert running["executor"] == "remote"
        done = wait_for(client, job["id"], final, timeout=300)
    check_finished(control, done)
    assert receipts(control) >= 2, "no callback was applied"
    load_with_peft(control, done["id"])
    check_receiver_refuses_what_it_must(control, done["id"], dataset)
    check_the_ui_says_where_it_ran(control, worker, done["id"], open_page)


def check_the_ui_says_where_it_ran(control, worker, job_id: str, open_page) -> None:
    from playwright.sync_api import expect

    with control.client() as client:
        place = client.get(f"/jobs/{job_id}/placement").json()
        system = client.get("/system").json()
    assert place["executor"] == "remote" and worker.url in place["where"] and place["remote_status"] == "completed"
    assert system["workers"] == [{"executor": "remote", "kind": "worker", "url": worker.url, "reachable": True,
                                  "detail": system["workers"][0]["detail"]}]
    assert "GPU(s)" in system["workers"][0]["detail"]
    page = open_page(control.url)
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#job-where")).to_contain_text(f"Runs on worker {worker.url}")
    expect(page.locator("#job-where")).to_contain_text("remote status: completed")
    page.goto("/")
    expect(page.locator("#workers")).to_contain_text("answers")
    worker.stop()
    page.reload()
    expect(page.locator("#workers")).to_contain_text("unreachable")
    # the worker trained it: its own storage holds the job, the control plane's holds no engine log of its own
    assert list((worker.home / "data" / "output").iterdir())
    assert "usf_bios.engine.run" not in control.home.joinpath("server.log").read_text()


def test_polling_alone_carries_a_job_through_cancel_and_resume(make_worker, make_control, tmp_path, tiny_template):
    """Every callback is refused (the two sides hold different secrets): polling alone brings every point. A cancel
    is forwarded to the worker (which checkpoints and stops), and a resume continues there from the checkpoint."""
    worker = make_worker().start()
    control = make_control(worker, USF_CALLBACK_SECRET="another-secret-so-every-callback-is-refused").start()
    model, dataset = prepare(control, tmp_path, tiny_template)
    with control.client() as client:
        job = submit(client, remote_spec(model, dataset, steps=40))
        wait_for(client, job["id"], lambda j: j["current_step"] >= 4 or final(j), timeout=240)
        assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
        cancelled = wait_for(client, job["id"], final, timeout=120)
        assert cancelled["status"] == "cancelled", cancelled
        assert cancelled["current_step"] < 40
        assert client.post(f"/jobs/{job['id']}/resume").status_code == 200
        done = wait_for(client, job["id"], final, timeout=300)
    check_finished(control, done, steps=40)
    assert receipts(control) == 0
    assert '"POST /api/callbacks/training HTTP/1.1" 401' in control.home.joinpath("server.log").read_text()
    worker_log = next((worker.home / "data" / "logs").glob("*.log")).read_text()
    assert "resuming from checkpoint-" in worker_log
    assert len(list((worker.home / "data" / "output").iterdir())) == 1   # the same remote job, continued


def test_a_worker_killed_mid_job_finishes_it_from_its_checkpoint(make_worker, make_control, tmp_path, tiny_template):
    """The worker is SIGKILLed with its engine and stays away longer than USF_REMOTE_TIMEOUT_S: the control plane
    interrupts the job and submits it again; once the worker is back it resumes from its checkpoint."""
    worker = make_worker().start()
    control = make_control(worker, USF_REMOTE_TIMEOUT_S="4", USF_MAX_ATTEMPTS="6").start()
    model, dataset = prepare(control, tmp_path, tiny_template)
    with control.client() as client:
        job = submit(client, remote_spec(model, dataset, steps=60))
        wait_for(client, job["id"], lambda j: j["current_step"] >= 4 or final(j), timeout=240)
        worker.stop(signal.SIGKILL)            # the worker process; its engine process is killed too
        from tests.api.conftest import kill_engines
        kill_engines(worker.home)
        wait_for(client, job["id"], lambda j: j["attempts"] >= 2 or final(j), timeout=60)
        worker.start()
        done = wait_for(client, job["id"], final, timeout=300)
    check_finished(control, done, steps=60)
    assert done["attempts"] >= 2
    assert "interrupted" in control.home.joinpath("server.log").read_text()
    worker_log = next((worker.home / "data" / "logs").glob("*.log")).read_text()
    assert "resuming from checkpoint-" in worker_log
    events = [json.loads(line) for line in next((worker.home / "data" / "logs").glob("*.events.jsonl")).read_text().splitlines() if line.strip()]
    steps = [e["step"] for e in events if e["type"] == "metric"]
    assert sorted(set(steps)) == list(range(1, 61))


def check_receiver_refuses_what_it_must(control, job_id: str, dataset_id: str) -> None:
    """Callbacks with a wrong signature, a stale timestamp or a replayed event id change nothing; a signed
    dataset URL opens its file only unaltered and unexpired."""
    import httpx

    from tests.worker.conftest import CALLBACK_SECRET
    from usf_bios.signing import sign_callback, sign_url_path

    with control.client() as client:
        before = client.get(f"/jobs/{job_id}/metrics").json()
    with sqlite3.connect(control.home / "data" / "usf.db") as db:
        replayed = db.execute("SELECT event_id FROM callback_receipts WHERE job_id = ? LIMIT 1", (job_id,)).fetchone()[0]
    external = replayed.split(":")[0]
    forged_point = {"seq": 10**9, "event": {"type": "metric", "step": 1, "epoch": 0.1, "loss": 123.0, "learning_rate": 0.1}}

    def callback(event_id: str, *, secret: str = CALLBACK_SECRET, t: int | None = None) -> httpx.Response:
        body = json.dumps({"kind": "metrics", "event_id": event_id, "after": 0, "events": [forged_point],
                           "status": {"external_job_id": external, "job_id": job_id, "status": "running"}}).encode()
        headers = {"X-USF-Signature": sign_callback(secret, body, t), "X-USF-Event-Id": event_id,
                   "Content-Type": "application/json"}
        return httpx.post(control.url + "/api/callbacks/training", content=body, headers=headers)

    assert callback("forged-1", secret="wrong-secret").status_code == 401
    assert callback("forged-2", t=int(time.time()) - 600).status_code == 401
    replay = callback(replayed)
    assert replay.status_code == 200 and replay.json() == {"accepted": False}
    no_signature = httpx.post(control.url + "/api/callbacks/training", json={"kind": "metrics"})
    assert no_signature.status_code == 401
    time.sleep(1.5)   # a scheduler tick or two
    with control.client() as client:
        assert client.get(f"/jobs/{job_id}/metrics").json() == before
        assert client.get(f"/jobs/{job_id}").json()["status"] == "completed"

    secret = (control.home / "secrets" / "url-signing.key").read_text().strip()
    path = f"/api/datasets/{dataset_id}/blob"
    expires = int(time.time()) + 600
    good = f"{control.url}{path}?expires={expires}&sig={sign_url_path(secret, path, expires)}"
    assert httpx.get(good).status_code == 200 and b"messages" in httpx.get(good).content
    past = int(time.time()) - 1
    for url in (good.replace("sig=", "sig=0"), good.replace(f"expires={expires}", f"expires={expires + 1}"),
                f"{control.url}/api/datasets/other{dataset_id}/blob?expires={expires}&sig={sign_url_path(secret, path, expires)}",
                f"{control.url}{path}?expires={past}&sig={sign_url_path(secret, path, past)}", f"{control.url}{path}"):
        answer = httpx.get(url)
        assert answer.status_code == 401, (url, answer.text)
    assert "sig=[redacted]" in control.home.joinpath("server.log").read_text()


def test_a_signature_that_is_not_hex_is_refused_not_a_server_error(make_worker, make_control):
    """A non-ASCII or non-hex ``sig`` / ``v1`` (or ``expires`` / ``t`` in other digits) is a bad signature: 401."""
    import httpx

    control = make_control(make_worker()).start()   # the worker is never asked
    future = str(int(time.time()) + 600)
    for expires, sig in ((future, "é" * 64), (future, "z" * 64), (future, "ab"), ("²" * 10, "a" * 64)):
        for method, path in (("GET", "/api/datasets/some-id/blob"), ("PUT", "/api/jobs/some-job/artifact")):
            answer = httpx.request(method, control.url + path, params={"expires": expires, "sig": sig}, content=b"x")
            assert answer.status_code == 401, (method, path, sig, answer.status_code, answer.text)
    body = json.dumps({"kind": "metrics", "event_id": "e1", "status": {"external_job_id": "x", "job_id": "y",
                                                                       "status": "running"}}).encode()
    for header in (f"t={int(time.time())},v1={'é' * 64}", f"t={int(time.time())},v1=nothex", "t=²²,v1=" + "a" * 64):
        answer = httpx.post(control.url + "/api/callbacks/training", content=body,
                            headers={"X-USF-Signature": header.encode(), "X-USF-Event-Id": "e1",
                                     "Content-Type": "application/json"})
        assert answer.status_code == 401, (header, answer.status_code, answer.text)
