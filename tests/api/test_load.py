"""A real server on loopback under load (bounded counts and times; tests/api/test_rest_postgres.py runs this module
again on PostgreSQL): 200 concurrent clients with API keys get an answer to every request, 200 event streams of one
job get every event, and afterwards the server answers at once and stops on SIGTERM within seconds. Latency figures
go to docs/benchmarks.md (`python scripts/load_server.py`); the issue's target (p99 < 100 ms) is asserted only with
USF_LOAD_TARGET=1, on a machine quiet enough to measure it (the tests beside this one would be measured too)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.api.flows import job_spec, register_model, run_async, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.bench.load import hammer, watch_events


pytestmark = pytest.mark.slow


def ready(make_server, tmp_path, tiny_model_template, **env: str):
    server = make_server(**env).start()
    key = server.create_key("load", admin=True) if env.get("USF_REQUIRE_AUTH") else None
    client = server.client(key)
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(24)), "chat")
    return server, client, key


def answers_and_stops(server) -> None:
    """The server answers at once after the load, and SIGTERM stops it within 10 s."""
    started = time.monotonic()
    assert httpx.get(server.url + "/api/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 5
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    assert time.monotonic() - started < 10


def test_200_concurrent_clients_get_every_answer(make_server, tmp_path, tiny_model_template):
    server, client, key = ready(make_server, tmp_path, tiny_model_template, USF_MAX_CPU_JOBS="0",  # jobs stay queued
                                USF_REQUIRE_AUTH="1")
    for i in range(50):
        submit(client, job_spec("tiny", "chat", name=f"job-{i}"))
    assert client.get("/jobs").json()["total"] == 50 and client.get("/health").status_code == 200   # warm
    listed = run_async(hammer("127.0.0.1", server.port, "/api/jobs", clients=200, requests=20, key=key, timeout=120))
    assert listed.errors == {} and dict(listed.statuses) == {200: 4000}, listed.summary()
    health = run_async(hammer("127.0.0.1", server.port, "/api/health", clients=200, requests=20, key=key, timeout=60))
    assert health.errors == {} and dict(health.statuses) == {200: 4000}, health.summary()
    refused = run_async(hammer("127.0.0.1", server.port, "/api/jobs", clients=20, requests=5, key="usf_wrong",
                               timeout=60))
    assert dict(refused.statuses) == {401: 100}, refused.summary()
    if os.environ.get("USF_LOAD_TARGET") == "1":   # issue 14's target, where the machine is quiet enough
        assert listed.percentile(99) < 0.1 and health.percentile(99) < 0.1, (listed.summary(), health.summary())
    answers_and_stops(server)


def test_200_event_streams_of_one_job_get_every_event(make_server, tmp_path, tiny_model_template):
    server, client, _ = ready(make_server, tmp_path, tiny_model_template)
    job = submit(client, job_spec("tiny", "chat", max_steps=30, eval_steps=10, save_steps=10))

    async def watch_while_probing():
        watchers = [watch_events("127.0.0.1", server.port, f"/api/jobs/{job['id']}/events", seconds=240)
                    for _ in range(200)]
        probe = hammer("127.0.0.1", server.port, "/api/health", clients=5, requests=40, timeout=10)
        return await asyncio.gather(asyncio.gather(*watchers), probe)

    watches, health = run_async(watch_while_probing())
    done = wait_for(client, job["id"], lambda j: j["status"] in ("completed", "failed"), timeout=60)
    assert done["status"] == "completed", done
    path = server.home / "data" / "logs" / f"{job['id']}.events.jsonl"
    expected, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        offset += len(line)
        expected.append(offset)
    assert len(event_dicts(path)) == len(expected) > 30
    assert all(w.error is None and w.ended for w in watches), [w for w in watches if w.error or not w.ended][:3]
    assert all(w.ids == expected for w in watches), [len(w.ids) for w in watches if w.ids != expected][:5]
    assert health.errors == {} and dict(health.statuses) == {200: 200}, health.summary()
    answers_and_stops(server)


def test_a_quiet_stream_sends_keep_alives(make_server, tmp_path, tiny_model_template):
    server, client, _ = ready(make_server, tmp_path, tiny_model_template, USF_MAX_CPU_JOBS="0")
    job = submit(client, job_spec("tiny", "chat"))      # queued for good: nothing to tell
    watch = run_async(watch_events("127.0.0.1", server.port, f"/api/jobs/{job['id']}/events", seconds=17))
    assert watch.error is None and watch.keepalives >= 1 and not watch.ended
    answers_and_stops(server)
