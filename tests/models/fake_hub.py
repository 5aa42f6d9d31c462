"""A small HTTP server on loopback that answers like the Hugging Face Hub for the few routes a snapshot download
uses (model info, the file tree, resolve with HEAD, GET and Range), serving repositories the test builds from
folders. It records every file request, and a repository may be gated behind a token. Point ``HF_ENDPOINT`` at
``FakeHub.url``; nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None   # gated: only this bearer token may read it


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)   # "repo/file" of every GET of a file
    delay_s: float = 0.0                               # per 64 KiB chunk: a slow download, for progress

    def add(self, repo_id: str, folder: Path | None = None, extra: dict[str, bytes] | None = None,
            token: str | None = None) -> None:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
            if folder else {}
        self.repos[repo_id] = Repo({**files, **(extra or {})}, token)

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    if hub.delay_s:
                        import time
                        for start in range(0, len(body), 65536):
                            self.wfile.write(body[start:start + 65536])
                            self.wfile.flush()
                            time.sleep(hub.delay_s)
                    else:
                        self.wfile.write(body)

            def _json(self, data: object) -> None:
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

            def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                                             "Content-Type": "application/json"}, head)
                    return None
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._send(403 if self.headers.get("Authorization") else 401,
                               b'{"error": "Access to this model is restricted."}',
                               {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted",
                                "Content-Type": "application/json"}, head)
                    return None
                return repo

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                    if (repo := self._repo(m[1])) is None:
                        return
                    if m[2] not in ("main", COMMIT):
                        self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
                        return
                    self._json({"_id": m[1], "id": m[1], "modelId": m[1], "sha": COMMIT, "private": False,
                                "gated": bool(repo.token), "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                                "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z",
                                "siblings": [{"rfilename": name, "size": len(data),
                                              "blobId": hashlib.sha1(data).hexdigest()}
                                             for name, data in repo.files.items()]})
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
                    if (repo := self._repo(m[1])) is None:
                        return
                    self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                for name, data in repo.files.items()])
                elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    if (repo := self._repo(m[1], head)) is None:
                        return
                    data = repo.files.get(m[3])
                    if data is None:
                        self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                        return
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                               "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                    if head:
                        self.send_response(200)
                        for key, value in headers.items():
                            self.send_header(key, value)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        return
                    hub.fetched.append(f"{m[1]}/{m[3]}")
                    ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                    if ranged:
                        start = int(ranged[1])
                        self._send(206, data[start:], {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                    else:
                        self._send(200, data, headers)
                else:
                    self._send(404, b"{}", {"Content-Type": "application/json"}, head)

            def do_GET(self) -> None:  # noqa: N802
                self._route(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
