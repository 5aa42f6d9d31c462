"""No API key in the server's log: uvicorn logs each request's path with its query string (``uvicorn.access``)
and each WebSocket handshake's (``uvicorn.error``), and browsers send their key as ``?token=usf_…`` on the
WebSocket URL. A filter on both loggers rewrites the value of ``token=`` and of any query parameter whose value
starts with ``usf_``, and the ``sig=`` of a signed dataset URL (and any other ``usf_…`` key in a message) to ``[redacted]`` before a handler sees it."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import weakref
from http import HTTPStatus
from typing import TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REDACTED = "[redacted]"
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")
_QUERY_VALUE = re.compile(r"(?P<name>[?&](?:token|sig|[^=&\s\"']+(?==usf_))=)[^&\s\"'#]*", re.IGNORECASE)
_KEY = re.compile(r"usf_[A-Za-z0-9_-]{16,}")


def redact_keys(text: str) -> str:
    """``/api/jobs/x/ws?since=3&token=usf_abc…`` → ``/api/jobs/x/ws?since=3&token=[redacted]``."""
    return _KEY.sub(REDACTED, _QUERY_VALUE.sub(lambda m: m["name"] + REDACTED, text))


class KeyRedactingFilter(logging.Filter):
    """Redacts keys in a record's message and in its string arguments (uvicorn passes the path as one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_keys(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_keys(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_keys(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_key_redaction() -> None:
    """Add the filter to uvicorn's loggers (once each); called at every start of the app (its lifespan), after
    uvicorn configured its logging, so it holds for ``usf-bios serve`` and ``uvicorn --factory`` alike."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KeyRedactingFilter) for f in logger.filters):
            logger.addFilter(KeyRedactingFilter())


_PHRASES = {int(s): s.phrase for s in HTTPStatus}
_ACCESS_LOGS: "weakref.WeakSet[AccessLog]" = weakref.WeakSet()


def flush_access_logs() -> None:
    """Write out what every access log still holds (the app's lifespan calls it as the server stops)."""
    for access_log in list(_ACCESS_LOGS):
        access_log.flush()


class AccessLog:
    """ASGI middleware: uvicorn's access line for each HTTP request (``INFO:     127.0.0.1:5 - "GET /api/jobs
    HTTP/1.1" 200 OK``, keys redacted), written for `usf-bios serve` in place of uvicorn's ``uvicorn.access``.
    Under load uvicorn's took about 30% of the server's CPU — a LogRecord, its formatter, the key filter and one
    write and flush per request; here a line is one f-string (redacted only when it can hold a key), and lines go
    out together at most ``flush_s`` later (and at the app's shutdown, ``flush_access_logs``: uvicorn ends a
    SIGTERMed process by raising the signal again, so no ``atexit`` handler runs then), one write each time."""

    def __init__(self, app: ASGIApp, stream: TextIO | None = None, flush_s: float = 0.2) -> None:
        self.app, self.stream, self.flush_s = app, stream, flush_s
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        _ACCESS_LOGS.add(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.log(scope, message["status"])
            await send(message)

        await self.app(scope, receive, logged)

    def log(self, scope: Scope, status: int) -> None:
        client = scope.get("client")
        where = f"{client[0]}:{client[1]}" if client else "-"
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        target = (path + b"?" + query if query else path).decode("latin-1")
        if query or "usf_" in target:
            target = redact_keys(target)
        self._lines.append(f'INFO:     {where} - "{scope["method"]} {target} HTTP/{scope.get("http_version", "1.1")}" '
                           f'{status} {_PHRASES.get(status, "")}\n')
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._lines:
            return
        text, self._lines = "".join(self._lines), []
        stream = self.stream or sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):   # the stream was closed (at exit)
            pass
