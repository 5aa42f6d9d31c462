"""The SSRF guard on outbound fetches: every non-public address refused (in any spelling), redirects judged like
the first URL, the connection made to the address that was checked, and a body over the cap cut off with nothing
left on disk. A real HTTP server on loopback plays the remote host."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from usf_bios.netguard import BlockedURL, fetch_to_file, resolve_checked

REFUSED_HOSTS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "017700000001", "localhost", "::1",
                 "[::1]", "::ffff:127.0.0.1", "::ffff:7f00:1", "10.0.0.1", "172.16.5.4", "192.168.1.1",
                 "169.254.169.254", "fd00::1", "fe80::1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "100.64.0.1",
                 "240.0.0.1", "255.255.255.255", "2002:7f00:1::", "198.18.0.1"]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_non_public_addresses_are_refused_in_every_spelling(host):
    with pytest.raises(BlockedURL, match="refused"):
        resolve_checked(host.strip("[]"), 80)


def test_a_public_address_passes_and_an_allowed_host_is_let_through():
    assert resolve_checked("93.184.216.34", 443) == "93.184.216.34"
    assert resolve_checked("127.0.0.1", 80, allowed_hosts=["127.0.0.1"]) == "127.0.0.1"


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    seen_hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen_hosts.append(self.headers.get("Host", ""))
        code, headers, body = self.routes.get(self.path.split("?")[0], (404, {}, b"no"))
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers and "X-No-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def remote():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.routes, Handler.seen_hosts = {}, []
    yield server.server_address[1]
    server.shutdown()


def test_a_file_streams_to_disk_with_its_sha256(remote, tmp_path: Path):
    import hashlib

    body = b'{"text": "hello"}\n' * 100
    Handler.routes["/data.jsonl"] = (200, {"Content-Disposition": 'attachment; filename="chat.jsonl"'}, body)
    got = fetch_to_file(f"http://localhost:{remote}/data.jsonl", tmp_path / "f", max_bytes=1 << 20,
                        allowed_hosts=["localhost"])
    assert got.sha256 == hashlib.sha256(body).hexdigest() and got.size_bytes == len(body)
    assert got.filename == "chat.jsonl" and (tmp_path / "f").read_bytes() == body
    assert Handler.seen_hosts == [f"localhost:{remote}"]   # the checked address, with the original Host header


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/data.jsonl", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::ffff:127.0.0.1]:{port}/x", "file:///etc/passwd", "gopher://localhost/"])
def test_a_redirect_from_an_allowed_host_to_a_private_one_is_refused(remote, tmp_path: Path, target: str):
    Handler.routes["/start"] = (302, {"Location": target.format(port=remote)}, b"")
    with pytest.raises(BlockedURL):
        fetch_to_file(f"http://localhost:{remote}/start", tmp_path / "f", max_bytes=1 << 20, allowed_hosts=["localhost"])
    assert not (tmp_path / "f").exists()


def test_too_many_redirects_are_refused(remote, tmp_path: Path):
    Handler.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(BlockedURL, match="redirects"):
        fetch_to_file(f"http://localhost:{remote}/loop", tmp_path / "f", max_bytes=1 << 20, allowed_hosts=["localhost"])


def test_a_body_over_the_cap_is_cut_off_and_nothing_stays_on_disk(remote, tmp_path: Path):
    Handler.routes["/declared"] = (200, {}, b"x" * 5000)
    with pytest.raises(BlockedURL, match="limit"):
        fetch_to_file(f"http://localhost:{remote}/declared", tmp_path / "a", max_bytes=4096, allowed_hosts=["localhost"])
    # a body that declares no size (read until the connection closes) is cut at the cap too
    Handler.routes["/streamed"] = (200, {"X-No-Length": "1"}, b"z" * 90000)
    with pytest.raises(BlockedURL, match="limit"):
        fetch_to_file(f"http://localhost:{remote}/streamed", tmp_path / "b", max_bytes=4096, allowed_hosts=["localhost"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_credentials_in_the_url_and_other_schemes_are_refused(tmp_path: Path):
    for url in ("http://user:pw@example.com/x", "ftp://example.com/x", "/relative/path"):
        with pytest.raises(BlockedURL):
            fetch_to_file(url, tmp_path / "f", max_bytes=10)
