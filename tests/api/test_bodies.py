"""Bodies are read only from callers who may send them, and never beyond USF_MAX_JSON_KB: a real server on loopback
with API keys required, its memory read from /proc."""

from __future__ import annotations

import socket
import time

import pytest


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_big_body(port: int, path: str, total: int, headers: str, chunked: bool) -> bytes:
    """Stream ``total`` bytes of JSON-ish body; stop as soon as the server answers; return the answer's head."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n"
                     f"{headers}\r\n".encode())
        piece, sent = b"[" + b"1," * (2**19), 0
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer += sock.recv(65536)
                if b"\r\n\r\n" in answer:
                    return answer
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return answer
            if sent < total:
                data = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
                try:
                    sock.send(data)
                    sent += len(piece)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
            else:
                time.sleep(0.01)
        return answer


@pytest.fixture
def keyed(make_server):
    server = make_server(USF_REQUIRE_AUTH="1", USF_MAX_JSON_KB="64").start()
    return server, server.create_key("me")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_without_a_key_is_refused_before_it_is_read(keyed, chunked):
    server, _key = keyed
    before = rss_mb(server.proc.pid)
    answer = send_big_body(server.port, "/api/jobs", 300 * 2**20, "", chunked)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert rss_mb(server.proc.pid) - before < 50
    answer = send_big_body(server.port, "/api/jobs", 300 * 2**20, "Authorization: Bearer usf_wrong\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 401") and b"invalid or revoked" in answer


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversize_json_body_is_cut_off_at_the_cap(keyed, chunked):
    server, key = keyed
    before = rss_mb(server.proc.pid)
    answer = send_big_body(server.port, "/api/jobs", 100 * 2**20, f"Authorization: Bearer {key}\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"USF_MAX_JSON_KB" in answer, answer[:300]
    assert rss_mb(server.proc.pid) - before < 50
    with server.client(key) as client:      # a body under the cap is read as before
        small = client.post("/jobs", json={"name": "x", "base_model": "m", "dataset": "d", "gpu_config": {"num_gpus": 0}})
        assert small.status_code == 422 and small.json()["errors"][0]["field"] == "base_model"
