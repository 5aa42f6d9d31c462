"""What a web page in the user's browser cannot do to a real server: DNS rebinding (Host), cross-site writes (Origin)."""

from __future__ import annotations

import socket

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.api.flows import upload_dataset
from tests.conftest import chat_rows, write_jsonl
from usf_bios.api.guard import split_host

EVIL = "http://evil.example"


def test_split_host():
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]") == ("::1", None) and split_host("[::1]:80") == ("::1", 80)
    assert split_host("127.0.0.1.") == ("127.0.0.1", None)
    for bad in ("", ":80", "::1", "[::1", "[::1]x", "a:b", "a:99999"):
        assert split_host(bad) is None, bad


def test_loopback_server_answers_only_to_loopback_host_names(server):
    with httpx.Client(base_url=server.url) as raw:
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}",
                     "127.0.0.1"):
            assert raw.get("/api/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{server.port}", "localhost.evil.example", "127.0.0.1.nip.io", ""):
            refused = raw.get("/api/health", headers={"Host": host})
            assert refused.status_code == 400 and refused.json()["detail"].startswith("Host not allowed"), host
        assert raw.get("/", headers={"Host": "evil.example"}).status_code == 400   # the dashboard too
        assert raw.post("/api/keys", json={"name": "x"}, headers={"Host": "evil.example"}).status_code == 400
    with pytest.raises(InvalidStatus) as refused:   # the name resolved to 127.0.0.1 (the rebinding)
        connect(f"ws://evil.example:{server.port}/api/jobs/x/ws", sock=socket.create_connection(("127.0.0.1", server.port)))
    assert refused.value.response.status_code == 403


def test_allowed_hosts_extend_the_loopback_names(make_server):
    server = make_server(USF_ALLOWED_HOSTS="bios.lan, Other.Example").start()
    with httpx.Client(base_url=server.url) as raw:
        for host in ("bios.lan", "bios.lan:443", "other.example", "localhost"):
            assert raw.get("/api/health", headers={"Host": host}).status_code == 200, host
        assert raw.get("/api/health", headers={"Host": "evil.example"}).status_code == 400


def test_cross_site_writes_are_refused_same_origin_and_scripts_pass(server, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    with server.client() as client:
        for method, path in (("POST", "/keys"), ("POST", "/jobs/estimate"), ("DELETE", "/datasets/x"),
                             ("PUT", "/jobs/x"), ("PATCH", "/jobs/x")):
            for origin in (EVIL, "null", f"http://localhost:{server.port}", f"https://127.0.0.1:{server.port}",
                           "http://127.0.0.1"):
                refused = client.request(method, path, json={"name": "x"}, headers={"Origin": origin})
                assert refused.status_code == 403, (method, path, origin)
                assert "cross-origin request refused" in refused.json()["detail"]
        files = {"file": ("chat.jsonl", dataset.read_bytes(), "application/octet-stream")}
        refused = client.post("/datasets", files=files, data={"name": "evil"}, headers={"Origin": EVIL})
        assert refused.status_code == 403 and client.get("/datasets").json() == []
        # the dashboard's own requests (same origin) and scripts without Origin work
        same = client.post("/datasets", files=files, data={"name": "same"}, headers={"Origin": server.url})
        assert same.status_code == 201, same.text
        assert upload_dataset(client, dataset, name="script")["name"] == "script"
        assert client.post("/keys", json={"name": "k"}, headers={"Origin": server.url}).status_code == 201
        # reads are not writes (and without CORS headers the other site cannot read the answer)
        read = client.get("/datasets", headers={"Origin": EVIL})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        # behind a TLS-terminating proxy the scheme comes from X-Forwarded-Proto
        proxied = client.post("/keys", json={"name": "p"},
                              headers={"Origin": "https://127.0.0.1", "Host": "127.0.0.1", "X-Forwarded-Proto": "https"})
        assert proxied.status_code == 201, proxied.text


def test_websocket_from_another_site_is_refused(server):
    url = f"ws://127.0.0.1:{server.port}/api/jobs/nope/ws"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=EVIL)
    assert refused.value.response.status_code == 403
    for origin in (server.url, None):   # the dashboard's page, or a script: the handshake passes (then 4404)
        with connect(url, origin=origin) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
        assert closed.value.rcvd.code == 4404


def test_with_api_keys_any_host_but_still_no_cross_site_writes(make_server):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    admin = server.create_key("admin", admin=True)
    with server.client(admin) as client:
        assert client.get("/health", headers={"Host": "bios.example.com"}).status_code == 200
        assert client.post("/keys", json={"name": "x"}, headers={"Origin": EVIL}).status_code == 403
        same = client.post("/keys", json={"name": "y"}, headers={"Origin": "https://bios.example.com",
                                                                  "Host": "bios.example.com", "X-Forwarded-Proto": "https"})
        assert same.status_code == 201, same.text
