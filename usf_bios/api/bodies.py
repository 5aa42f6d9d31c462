"""Request bodies are read only from callers who may send them, and never beyond a cap.

FastAPI reads a JSON body whole before it resolves the route's dependencies, so without this an unauthenticated
300 MB ``POST /api/jobs`` took the server from 424 MB to 1.3 GB before its 401. This ASGI middleware runs first:

- when API keys are required, a POST/PUT/PATCH/DELETE under /api without a valid key is answered 401 before a byte
  of its body is read (the caller it finds is handed on in the scope's state, so the route does not look it up
  again);
- a JSON (not multipart) body larger than ``USF_MAX_JSON_KB`` is answered 413: at once when its Content-Length says
  so, else as soon as the bytes received pass the cap (the body is read into memory only up to the cap, then
  handed to the app). Multipart uploads stream to disk under their own cap (api/uploads.py).
"""

from __future__ import annotations

import re

from typing import Any, Awaitable, Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from usf_bios.control.keys import Caller

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SIGNED_WRITES = frozenset({"/api/callbacks/training"})   # a worker's callbacks carry a signature, not an API key
# a RunPod handler's artifact upload: a signed URL, and a tar streamed to disk by its route (not a JSON body)
SIGNED_UPLOAD = re.compile(r"^/api/jobs/[^/]+/artifact$")
Authenticate = Callable[[str | None], Awaitable["Caller | None"]]


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class BodyGuard:
    def __init__(self, app: Any, max_json_bytes: int, authenticate: Authenticate | None):
        self.app, self.max_json_bytes, self.authenticate = app, max_json_bytes, authenticate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] not in WRITES or not scope["path"].startswith("/api/")
                or (scope["method"] == "PUT" and SIGNED_UPLOAD.match(scope["path"]))):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.authenticate is not None and scope["path"] not in SIGNED_WRITES:
            key = bearer(headers.get("authorization"))
            caller = await self.authenticate(key) if key else None
            if caller is None:
                detail = "invalid or revoked API key" if key else "an API key is required: send 'Authorization: Bearer <key>'"
                await JSONResponse({"detail": detail}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        if headers.get("content-type", "").lower().startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_json_bytes:
            await self._too_large(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_json_bytes:
                await self._too_large(scope, receive, send)
                return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        limit = self.max_json_bytes / 1024
        await JSONResponse({"detail": f"the request body is larger than the limit of {limit:g} KiB (USF_MAX_JSON_KB)"},
                           status_code=413, headers={"Connection": "close"})(scope, receive, send)
