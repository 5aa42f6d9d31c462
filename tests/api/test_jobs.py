"""Jobs through the REST API on a real server: submit, follow, cancel, resume, isolate, refuse bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl


@pytest.fixture
def ready(server, tiny_model_template, tmp_path):
    """A server with a registered tiny model and an uploaded chat dataset."""
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(40)), name="chat")
    yield server, client
    client.close()


def sse_events(server, job_id: str, headers: dict | None = None, timeout: float = 300) -> list[tuple[str | None, str, dict]]:
    """Read the SSE stream to its end: (id, event, data) triples."""
    out, current = [], {}
    with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events", headers=headers or {}, timeout=timeout) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    out.append((current.get("id"), current.get("event", "message"), json.loads(current["data"])))
                current = {}
            elif not line.startswith(":") and ":" in line:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return out


def is_utc(value: str) -> bool:
    """An ISO 8601 timestamp that says it is UTC ('Z' or '+00:00'), not a naive one a browser reads as local."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment.utcoffset() == timedelta(0)


def test_job_runs_to_completion_and_everything_about_it_is_readable(ready):
    server, client = ready
    job = submit(client, job_spec("tiny", "chat", max_steps=10))
    assert job["status"] == "queued" and job["attempts"] == 0 and job["spec"]["base_model"] == "tiny"
    stream = sse_events(server, job["id"])
    metric_steps = [data["step"] for _, kind, data in stream if kind == "metric"]
    assert metric_steps == list(range(1, 11))
    ids = [int(i) for i, _, _ in stream if i is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    statuses = [data["status"] for _, kind, data in stream if kind == "status"]
    assert statuses[-1] == "completed" and "running" in statuses
    assert [data["status"] for _, kind, data in stream if kind == "done"] == ["completed"]

    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "completed" and done["progress"] == 1.0 and done["total_steps"] == 10
    assert done["current_step"] == 10 and done["finished_at"] and done["started_at"]
    assert all(is_utc(done[k]) for k in ("created_at", "started_at", "finished_at")), done
    assert done["artifact"] == {"name": "api-job", "version": 1} and done["metrics"]["loss"] is not None
    points = client.get(f"/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in points] == list(range(1, 11))
    assert points[4]["validation_loss"] is not None and points[0]["tokens_per_second"] > 0
    assert all(p["tokens"] > 0 and p["step_seconds"] > 0 for p in points)
    assert points[0]["tokens_per_second"] == pytest.approx(points[0]["tokens"] / points[0]["step_seconds"], rel=0.05)
    assert "step 10/10" in client.get(f"/jobs/{job['id']}/logs", params={"tail": 20}).text
    tail = client.get(f"/jobs/{job['id']}/logs", params={"tail": 2}).text.splitlines()
    assert len(tail) == 2 and tail[-1].endswith("done: completed")
    assert [c["step"] for c in client.get(f"/jobs/{job['id']}/checkpoints").json()] == [5]

    # reconnecting after event id N replays only what came after N
    last_seen = ids[3]
    again = sse_events(server, job["id"], headers={"Last-Event-ID": str(last_seen)})
    assert [int(i) for i, _, _ in again if i is not None] == [i for i in ids if i > last_seen]

    # the WebSocket carries the same feed
    with connect(f"ws://127.0.0.1:{server.port}/api/jobs/{job['id']}/ws?since={last_seen}") as ws:
        messages = [json.loads(m) for m in ws]
    assert [m["id"] for m in messages if "id" in m] == [i for i in ids if i > last_seen]
    assert messages[-1] == {**messages[-1], "type": "status", "status": "completed"}

    second = submit(client, job_spec("tiny", "chat", max_steps=2))
    assert wait_for(client, second["id"], final)["artifact"] == {"name": "api-job", "version": 2}
    listed = client.get("/jobs", params={"status": "completed", "limit": 1}).json()
    assert listed["total"] == 2 and len(listed["items"]) == 1 and listed["items"][0]["id"] == second["id"]


def test_cancel_keeps_the_checkpoint_and_resume_finishes_with_one_point_per_step(ready):
    server, client = ready
    job = submit(client, job_spec("tiny", "chat", max_steps=400, save_steps=1000, eval_steps=1000))
    # SSE streams through the request guard: a metric arrives while the job still runs
    with httpx.stream("GET", f"{server.url}/api/jobs/{job['id']}/events", timeout=120,
                      headers={"Origin": server.url}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "event: metric":
                break
    assert not final(client.get(f"/jobs/{job['id']}").json())
    wait_for(client, job["id"], lambda j: j["current_step"] >= 3)
    cancelled = client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    stopped = wait_for(client, job["id"], final)
    assert stopped["status"] == "cancelled"
    kept = client.get(f"/jobs/{job['id']}/checkpoints").json()
    assert len(kept) == 1 and kept[0]["step"] >= 3
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 409

    resumed = client.post(f"/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    finished = wait_for(client, job["id"], final)
    assert finished["status"] == "completed", finished["error"]
    points = client.get(f"/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in points] == list(range(1, 401))
    log = json.loads((server.home / "data" / "output" / job["id"] / "training_log.json").read_text())
    assert [p["step"] for p in log] == list(range(1, 401))
    assert client.post(f"/jobs/{job['id']}/resume").status_code == 409  # completed is final


def test_cancel_of_a_queued_job_is_immediate(ready, make_server):
    server, client = ready
    spec = job_spec("tiny", "chat", max_steps=100_000, save_steps=100_000, eval_steps=100_000)
    first, second = submit(client, spec), submit(client, spec)  # USF_MAX_CPU_JOBS=1: the second waits
    wait_for(client, first["id"], lambda j: j["status"] == "running")
    assert client.get(f"/jobs/{second['id']}").json()["status"] == "queued"
    assert client.post(f"/jobs/{second['id']}/cancel").json()["status"] == "cancelled"
    client.post(f"/jobs/{first['id']}/cancel")
    assert wait_for(client, first["id"], final)["status"] == "cancelled"


def test_an_engine_stopped_from_outside_ends_cancelled_with_its_checkpoint(ready):
    """A SIGTERM that did not come from this server (a Ctrl-C, a drained node): the engine saves a checkpoint and
    says cancelled, and the job ends cancelled (it stayed running forever: a running job may not become cancelled
    without a cancel's steps), resumable from that checkpoint."""
    from tests.api.test_distributed_jobs import job_processes

    server, client = ready
    job = submit(client, job_spec("tiny", "chat", max_steps=100_000, save_steps=100_000, eval_steps=100_000))
    wait_for(client, job["id"], lambda j: j["current_step"] >= 2 or final(j))
    (pid,) = job_processes(job["id"])["single"]
    os.kill(pid, signal.SIGTERM)
    stopped = wait_for(client, job["id"], final, timeout=60)
    assert stopped["status"] == "cancelled", stopped
    assert client.get(f"/jobs/{job['id']}/checkpoints").json()
    assert "stopped from outside" in (server.home / "server.log").read_text()
    assert client.post(f"/jobs/{job['id']}/resume").json()["status"] == "queued"
    wait_for(client, job["id"], lambda j: (j["status"] == "running" and j["current_step"] > stopped["current_step"])
             or final(j))
    client.post(f"/jobs/{job['id']}/cancel")
    assert wait_for(client, job["id"], final)["status"] == "cancelled"


def test_bad_specs_get_422_naming_the_field(ready):
    _, client = ready
    bad = client.post("/jobs", json=job_spec("tiny", "chat", lora_r=0))
    assert bad.status_code == 422 and "hyperparameters.lora_r: must be ≥ 1" in bad.json()["detail"]
    unknown = client.post("/jobs", json={**job_spec("tiny", "chat"), "colour": "red"})
    assert unknown.status_code == 422 and "colour: unknown field" in unknown.json()["detail"]
    wrong_type = client.post("/jobs", json=job_spec("tiny", "chat", batch_size="four"))
    assert wrong_type.status_code == 422 and "hyperparameters.batch_size" in wrong_type.json()["detail"]
    malformed = client.post("/jobs", content=b'{"name": ', headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and "malformed JSON" in malformed.json()["detail"]
    missing = client.post("/jobs", json=job_spec("nope", "chat"))
    assert missing.status_code == 422 and missing.json()["detail"].startswith("base_model: no registered model 'nope'")
    assert missing.json()["errors"] == [{"field": "base_model", "message": missing.json()["detail"][len("base_model: "):]}]
    for dataset in ("../../etc/passwd", "/etc/passwd", "%2e%2e/x"):
        for path in ("/jobs", "/jobs/estimate"):
            refused = client.post(path, json=job_spec("tiny", dataset))
            assert refused.status_code == 422 and refused.json()["detail"].startswith("dataset: no registered dataset")
            assert [e["field"] for e in refused.json()["errors"]] == ["dataset"]
    assert client.get("/jobs").json()["total"] == 0


def test_estimate_before_anything_runs(ready):
    server, client = ready
    cpu = client.post("/jobs/estimate", json=job_spec("tiny", "chat", max_steps=None, num_epochs=2)).json()
    assert cpu["examples"] == 40 and cpu["steps"] > 0 and cpu["tokens_per_epoch"] > 0 and cpu["gpu_type"] == "cpu"
    assert cpu["estimated_seconds"] > 0 and cpu["peak_vram_gb"] is None and cpu["cost"] == 0
    gpu_spec = job_spec("tiny", "chat", quantization="4bit")
    gpu_spec["gpu_config"] = {"num_gpus": 1, "gpu_type": "H100"}
    gpu = client.post("/jobs/estimate", json=gpu_spec).json()
    assert gpu["peak_vram_gb"] > 0 and gpu["price_per_gpu_hour"] == 2.5 and gpu["estimated_seconds"] > 0
    assert gpu["cost"] == pytest.approx(gpu["estimated_seconds"] / 3600 * 2.5, rel=0.01, abs=1e-6)
    assert gpu["lora_parameters"] > 0 and gpu["parameters"] > gpu["lora_parameters"]
    assert client.get("/jobs").json()["total"] == 0  # nothing was queued

    # the same figures as the estimate computed from scratch (every length in dataset order; the engine's split)
    from usf_bios.control.estimate import estimate_job
    from usf_bios.datasets.formats import load_dataset
    from usf_bios.datasets.stats import token_lengths
    from usf_bios.engine.model import load_tokenizer
    from usf_bios.models.sources import ResolvedModel
    from usf_bios.settings import Settings
    from usf_bios.spec import JobSpec

    model = client.get("/models/tiny").json()
    dataset = client.get("/datasets/chat").json()
    tokenizer = load_tokenizer(ResolvedModel("tiny", Path(model["path"]), "local"), trust_remote_code=False)
    lengths = token_lengths(load_dataset(server.home / "data" / "datasets" / dataset["id"] / "chat.jsonl").examples,
                            tokenizer)
    prices = Settings.model_fields["gpu_prices"].default
    expected = estimate_job(JobSpec.model_validate(gpu_spec), lengths, Path(model["path"]), model["parameters"], prices)
    assert gpu["warning"] and "gpu_config.num_gpus" in gpu["warning"]   # this host has no GPU (the server's view)
    assert {**gpu, "warning": None} == json.loads(expected.model_dump_json())


def test_estimate_errors_name_the_field_and_the_dataset(ready, tiny_model_template):
    server, client = ready
    wrong = client.post("/jobs/estimate", json={**job_spec("tiny", "chat"), "dataset_format": "alpaca"})
    assert wrong.status_code == 422, wrong.text
    [error] = wrong.json()["errors"]
    assert error["field"] == "dataset_format" and wrong.json()["detail"] == f"dataset_format: {error['message']}"
    assert error["message"].startswith("dataset 'chat' is not in the alpaca format: chat.jsonl:1: missing field")
    assert str(server.home) not in wrong.text

    register_model(client, "plain", tiny_model_in(server.home, name="test--plain", chat_template=None))
    no_template = client.post("/jobs/estimate", json=job_spec("plain", "chat"))
    assert no_template.status_code == 422, no_template.text
    [error] = no_template.json()["errors"]
    assert error["field"] == "base_model" and "model 'plain' cannot tokenize dataset 'chat'" in error["message"]
    assert "no chat template" in error["message"]

    broken = tiny_model_in(server.home, tiny_model_template, name="test--broken")
    register_model(client, "broken", broken)
    (broken / "tokenizer.json").write_text("{ not json")
    unusable = client.post("/jobs/estimate", json=job_spec("broken", "chat"))
    assert unusable.status_code == 422 and unusable.json()["errors"][0]["field"] == "base_model", unusable.text
    assert client.post("/jobs/estimate", json=job_spec("tiny", "chat")).status_code == 200


def test_concurrent_estimates_tokenize_once_and_a_changed_file_again(local_app, tiny_model_template, tmp_path):
    from usf_bios.control import token_lengths

    client = local_app.client
    register_model(client, "tiny", tiny_model_in(local_app.home, tiny_model_template))
    dataset = upload_dataset(client, write_jsonl(tmp_path / "big.jsonl", chat_rows(3000)), name="big")
    spec = job_spec("tiny", "big")
    before = token_lengths.tokenizations
    start = threading.Barrier(3)

    def ask() -> httpx.Response:
        start.wait()
        return client.post("/jobs/estimate", json=spec)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: ask(), range(3)))
    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].json()["examples"] == 3000
    assert token_lengths.tokenizations == before + 1
    # the dataset's stats under the same model use the same lengths
    assert client.get("/datasets/big", params={"model": "tiny"}).json()["token_stats"]["max"] > 0
    assert token_lengths.tokenizations == before + 1

    stored = local_app.home / "data" / "datasets" / dataset["id"] / "big.jsonl"
    write_jsonl(stored, chat_rows(3000)[:100])
    changed = client.post("/jobs/estimate", json=spec)
    assert changed.status_code == 200 and changed.json()["examples"] == 100
    assert token_lengths.tokenizations == before + 2


def test_every_datetime_the_api_sends_says_utc(ready):
    """Read back from the database (SQLite keeps no offset); a job's started_at and finished_at: the first test."""
    _, client = ready
    job = submit(client, job_spec("tiny", "chat", max_steps=1))
    key = client.post("/keys", json={"name": "k"}).json()
    client.delete(f"/keys/{key['id']}")
    stamps = [job["created_at"], client.get(f"/jobs/{job['id']}").json()["created_at"],
              client.get("/jobs").json()["items"][0]["created_at"], client.get("/datasets").json()[0]["created_at"],
              client.get("/datasets/chat").json()["created_at"], client.get("/models").json()[0]["created_at"],
              key["created_at"], *[v for k in client.get("/keys").json() for v in (k["created_at"], k["revoked_at"])]]
    assert all(isinstance(s, str) and is_utc(s) for s in stamps), stamps


def test_keys_isolate_jobs_and_auth_is_required(make_server, tiny_model_template, tmp_path):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    admin, alice, bob = server.create_key("admin", admin=True), server.create_key("alice"), server.create_key("bob")
    with server.client() as anonymous:
        assert anonymous.get("/jobs").status_code == 401
        assert anonymous.get("/health").status_code == 200
    with server.client(alice) as a, server.client(bob) as b, server.client(admin) as root:
        register_model(a, "tiny", tiny_model_in(server.home, tiny_model_template))
        upload_dataset(a, write_jsonl(tmp_path / "chat.jsonl", chat_rows(10)), name="chat")
        job = submit(a, job_spec("tiny", "chat", max_steps=2))
        # bob cannot see or touch alice's job, nor use her model and dataset
        for method, path in [("GET", ""), ("POST", "/cancel"), ("POST", "/resume"), ("GET", "/metrics"),
                             ("GET", "/logs"), ("GET", "/checkpoints"), ("GET", "/download"), ("GET", "/events")]:
            assert b.request(method, f"/jobs/{job['id']}{path}").status_code == 404, path
        assert b.get("/jobs").json()["total"] == 0
        assert b.post("/jobs", json=job_spec("tiny", "chat")).status_code == 422
        assert root.get(f"/jobs/{job['id']}").status_code == 200 and root.get("/jobs").json()["total"] == 1
        assert wait_for(a, job["id"], final)["status"] == "completed"
        ws_url = f"ws://127.0.0.1:{server.port}/api/jobs/{job['id']}/ws"
        with connect(f"{ws_url}?token={alice}") as ws:
            assert any(json.loads(m).get("type") == "metric" for m in ws)
        for token, code in ((bob, 4404), (None, 4401)):
            with connect(ws_url + (f"?token={token}" if token else "")) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv()
            assert closed.value.rcvd.code == code
        assert b.post("/keys", json={"name": "x"}).status_code == 403
        with httpx.Client() as raw:
            assert raw.get(f"{server.url}/api/jobs", headers={"Authorization": "Bearer usf_wrong"}).status_code == 401


TRAVERSAL = ["../x", "..%2Fx", "%2e%2e%2fx", "%252e%252e%252fx", "..%5cx", "%2Fetc%2Fpasswd", "....//x", "x%00y",
             "..%2F..%2F..%2Fetc%2Fpasswd"]


def test_job_routes_refuse_traversal(server):
    with httpx.Client(base_url=server.url) as raw:
        for job_id in TRAVERSAL:
            for suffix in ("", "/metrics", "/logs", "/checkpoints", "/download", "/events"):
                response = raw.get(f"/api/jobs/{job_id}{suffix}")
                assert response.status_code == 404, (job_id, suffix, response.status_code)
