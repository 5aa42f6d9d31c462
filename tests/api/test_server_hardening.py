"""A real server keeps keys out of its log, requires keys when it cannot know its bind, sweeps orphan uploads at
start and refuses a request with two Host headers."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.api.conftest import free_port
from tests.api.flows import run_async
from usf_bios.api.guard import RequestGuard
from usf_bios.api.logs import KeyRedactingFilter, redact_keys


def test_redact_keys():
    key = "usf_" + "a1B2-c3_D4" * 4
    assert redact_keys(f"GET /api/jobs/x/ws?since=3&token={key} HTTP/1.1") == \
        "GET /api/jobs/x/ws?since=3&token=[redacted] HTTP/1.1"
    assert redact_keys("/x?TOKEN=abc&b=1") == "/x?TOKEN=[redacted]&b=1"
    assert redact_keys(f"/x?key={key}&b=2") == "/x?key=[redacted]&b=2"
    assert redact_keys(f"bearer {key}") == "bearer [redacted]"
    assert redact_keys("/api/jobs?limit=5&offset=0") == "/api/jobs?limit=5&offset=0"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s" %d',
                               ("127.0.0.1:5", "GET", f"/p?token={key}", 200), None)
    KeyRedactingFilter().filter(record)
    assert key not in record.getMessage() and "token=[redacted]" in record.getMessage()


def test_keys_on_urls_never_reach_the_log(make_server):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    key = server.create_key("browser")
    other = server.create_key("script")
    with connect(f"ws://127.0.0.1:{server.port}/api/jobs/nope/ws?since=0&token={key}") as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)   # closed with 4404: the key was read, the job does not exist
    assert ws.close_code == 4404
    assert httpx.get(f"{server.url}/api/jobs?token={key}", timeout=10).status_code == 401   # only a Bearer header counts
    assert httpx.get(f"{server.url}/api/health?k={other}", timeout=10).status_code == 200
    time.sleep(0.5)
    log = (server.home / "server.log").read_text()
    assert key not in log and other not in log and key[4:] not in log
    assert "/api/jobs/nope/ws?since=0&token=[redacted]" in log
    assert "/api/jobs?token=[redacted]" in log and "/api/health?k=[redacted]" in log


def test_the_access_log_has_one_line_a_request_in_uvicorns_format_and_flushes_at_exit(make_server):
    """`usf-bios serve` writes the access log itself (api/logs.AccessLog), uvicorn's is off: each request once,
    the guard's refusals included, and the lines still buffered at SIGTERM reach the log."""
    server = make_server().start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/api/health").status_code == 200
        for i in range(30):
            assert client.get(f"/api/jobs/nope-{i}", params={"since": i}).status_code == 404
        assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    server.stop()   # at once: the last lines are still in the buffer
    log = (server.home / "server.log").read_text()
    for i in range(30):
        assert log.count(f'"GET /api/jobs/nope-{i}?since={i} HTTP/1.1" 404 Not Found\n') == 1, log[-3000:]
    assert re.search(r'^INFO: {5}127\.0\.0\.1:\d+ - "GET /api/health HTTP/1\.1" 200 OK$', log, re.MULTILINE), log[-3000:]
    assert log.count('"GET /api/health HTTP/1.1" 400 Bad Request') == 1


def _start_uvicorn_factory(env: dict[str, str], port: int, log_path) -> subprocess.Popen:
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "usf_bios.api.main:app_factory",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(log_path.read_text()[-3000:])


def test_uvicorn_factory_requires_keys_even_on_loopback(server_env, tmp_path):
    port = free_port()
    env = {**server_env, "USF_HOST": "127.0.0.1"}   # what USF_HOST says is not what uvicorn was told to bind
    proc = _start_uvicorn_factory(env, port, tmp_path / "factory.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=10) as client:
            refused = client.get("/jobs")
            assert refused.status_code == 401 and "API key is required" in refused.json()["detail"]
            assert client.get("/jobs", headers={"Authorization": "Bearer usf_nope"}).status_code == 401
            key = subprocess.run([sys.executable, "-m", "usf_bios", "keys", "create", "--name", "a", "--admin"],
                                 env=env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1]
            assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert key not in (tmp_path / "factory.log").read_text()


def test_orphan_uploads_are_swept_at_start_and_fresh_ones_stay(make_server):
    server = make_server()
    uploads = server.home / "data" / "uploads"
    uploads.mkdir(parents=True)
    old = time.time() - 2 * 3600
    orphans = [uploads / "0a1b.part", uploads / "2c3d.jsonl", uploads / "4e5f.csv"]
    for path in orphans:
        path.write_bytes(b'{"messages": []}\n' * 10)
        os.utime(path, (old, old))
    fresh = uploads / "6a7b.part"   # another server on this USF_HOME is receiving it right now
    fresh.write_bytes(b"partial")
    server.start()
    assert not any(p.exists() for p in orphans)
    assert fresh.read_bytes() == b"partial"
    assert "removed 3 orphan upload file(s)" in (server.home / "server.log").read_text()


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("auth", [False, True])
def test_two_host_headers_are_refused(make_server, auth):
    server = make_server(**({"USF_REQUIRE_AUTH": "1"} if auth else {})).start()
    one = _raw_request(server.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert one.startswith(b"HTTP/1.1 200"), one[:200]
    for hosts in ((b"127.0.0.1", b"evil.example"), (b"evil.example", b"127.0.0.1"), (b"127.0.0.1", b"127.0.0.1")):
        request = (b"GET /api/health HTTP/1.1\r\nHost: " + hosts[0] + b"\r\nHost: " + hosts[1]
                   + b"\r\nConnection: close\r\n\r\n")
        answer = _raw_request(server.port, request)
        assert answer.startswith(b"HTTP/1.1 400"), (hosts, answer[:300])


async def _call(guard: RequestGuard, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await guard(scope, receive, send)
    return sent


@pytest.mark.parametrize("allowed_hosts", [None, {"127.0.0.1"}])
def test_guard_refuses_two_host_headers_in_the_scope(allowed_hosts):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(app, allowed_hosts=allowed_hosts)

    def scope(*hosts: bytes) -> dict:
        return {"type": "http", "method": "GET", "path": "/api/health", "scheme": "http",
                "headers": [(b"host", h) for h in hosts]}

    assert run_async(_call(guard, scope(b"127.0.0.1")))[0]["status"] == 200
    refused = run_async(_call(guard, scope(b"127.0.0.1", b"evil.example")))
    assert refused[0]["status"] == 400 and b"more than one Host header" in refused[1]["body"]
    ws = {**scope(b"127.0.0.1", b"127.0.0.1"), "type": "websocket"}
    assert run_async(_call(guard, ws))[0]["type"] == "websocket.close"
