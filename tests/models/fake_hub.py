"""Small HTTP servers on loopback that answer like a model hub for the few routes a snapshot download uses,
serving repositories the test builds from folders. Each records every file request, and a repository may be
gated behind a token. Nothing leaves the machine.

``FakeHub``: the Hugging Face Hub (model info, the file tree, resolve with HEAD, GET and Range); point
``HF_ENDPOINT`` at ``FakeHub.url``. ``FakeModelScope``: ModelScope's ``/api/v1`` routes that its SDK calls (the
file listing, a file with Range, the repository's info); point ``MODELSCOPE_ENDPOINT`` at its ``url``."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None   # gated: only this bearer token may read it


class Handler(BaseHTTPRequestHandler):
    """Sends what the hub's ``route`` decides."""

    protocol_version = "HTTP/1.1"
    hub: "FakeHub"

    def log_message(self, *_args: object) -> None:
        pass

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head or not body:
            return
        step = 65536 if self.hub.delay_s else len(body)
        for start in range(0, len(body), step):
            self.wfile.write(body[start:start + step])
            self.wfile.flush()
            if self.hub.delay_s:
                time.sleep(self.hub.delay_s)

    def send_json(self, data: object, status: int = 200, headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
        self.send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def send_file(self, data: bytes, headers: dict[str, str]) -> None:
        """The file whole, or from a ``Range: bytes=N-`` on (a resumed download)."""
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged[1]), int(ranged[2]) if ranged[2] else len(data) - 1
            self.send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
        else:
            self.send(200, data, headers)

    def do_GET(self) -> None:  # noqa: N802
        self.hub.route(self, head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.hub.route(self, head=True)


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
        handler = type("BoundHandler", (Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _repo(self, request: Handler, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            request.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                                    "Content-Type": "application/json"}, head)
            return None
        if repo.token and request.headers.get("Authorization") != f"Bearer {repo.token}":
            request.send(403 if request.headers.get("Authorization") else 401,
                         b'{"error": "Access to this model is restricted."}',
                         {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted",
                          "Content-Type": "application/json"}, head)
            return None
        return repo

    def route(self, request: Handler, head: bool) -> None:
        path = unquote(urlparse(request.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            if (repo := self._repo(request, m[1])) is None:
                return
            if m[2] not in ("main", COMMIT):
                request.send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
                return
            request.send_json({"_id": m[1], "id": m[1], "modelId": m[1], "sha": COMMIT, "private": False,
                               "gated": bool(repo.token), "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                               "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z",
                               "siblings": [{"rfilename": name, "size": len(data),
                                             "blobId": hashlib.sha1(data).hexdigest()}
                                            for name, data in repo.files.items()]})
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
            if (repo := self._repo(request, m[1])) is None:
                return
            request.send_json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                               for name, data in repo.files.items()])
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if (repo := self._repo(request, m[1], head)) is None:
                return
            data = repo.files.get(m[3])
            if data is None:
                request.send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                return
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if head:
                request.send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
                return
            self.fetched.append(f"{m[1]}/{m[3]}")
            request.send_file(data, headers)
        else:
            request.send(404, b"{}", {"Content-Type": "application/json"}, head)


@dataclass
class FakeModelScope(FakeHub):
    """ModelScope's answers: ``{"Code": 200, "Data": …, "Success": true}``, errors with the HTTP status and a
    ``Message``; revisions ``master`` and ``v1.0`` exist. ``calls`` records every request's path."""

    calls: list[str] = field(default_factory=list)
    REVISIONS = ("master", "v1.0")

    def _ms_repo(self, request: Handler, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            request.send_json({"Code": 10010205001, "Message": f"model {repo_id} does not exist", "Success": False},
                              404, head=head)
            return None
        if repo.token and f"m_session_id={repo.token}" not in request.headers.get("Cookie", "") and \
                request.headers.get("Authorization") != f"Bearer {repo.token}":
            request.send_json({"Code": 10010205004, "Message": "no permission to this model", "Success": False},
                              403 if request.headers.get("Authorization") else 401, head=head)
            return None
        return repo

    def route(self, request: Handler, head: bool) -> None:
        url = urlparse(request.path)
        path, query = unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
        self.calls.append(path)
        revision = query.get("Revision", "master")
        if m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path):
            if (repo := self._ms_repo(request, m[1])) is None:
                return
            if revision not in self.REVISIONS:
                request.send_json({"Code": 10010205002, "Message": f"revision {revision} not found",
                                   "Success": False}, 404)
                return
            request.send_json({"Code": 200, "Success": True, "Data": {"Files": [
                {"Name": name.rsplit("/", 1)[-1], "Path": name, "Type": "blob", "Size": len(data),
                 "Sha256": hashlib.sha256(data).hexdigest(), "Revision": COMMIT} for name, data in repo.files.items()]}})
        elif m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path):
            if (repo := self._ms_repo(request, m[1], head)) is None:
                return
            data = repo.files.get(query.get("FilePath", ""))
            if data is None or revision not in self.REVISIONS:
                request.send_json({"Code": 10010205003, "Message": "file not found", "Success": False}, 404, head=head)
                return
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if head:
                request.send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
                return
            self.fetched.append(f"{m[1]}/{query['FilePath']}")
            request.send_file(data, headers)
        elif m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)", path):
            if self._ms_repo(request, m[1], head) is None:
                return
            request.send_json({"Code": 200, "Success": True, "Data": {"Path": m[1].split("/")[0],
                                                                       "Name": m[1].split("/")[1]}}, head=head)
        else:
            request.send_json({"Code": 10010205001, "Message": "not found", "Success": False}, 404, head=head)
