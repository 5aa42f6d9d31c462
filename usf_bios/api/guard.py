"""What a web page in the user's browser must not be able to do to this server.

- DNS rebinding: a page on ``evil.example`` re-resolves its own name to 127.0.0.1 and then reads and writes the
  API as "same origin". Its requests carry ``Host: evil.example``. When API keys are not required (a loopback
  server), only loopback names and addresses (any port), ``USF_HOST`` and ``USF_ALLOWED_HOSTS`` are accepted
  as Host; anything else is answered 400 "Host not allowed".
- A request with more than one Host header is answered 400 on every deployment (the checks read one).
- Cross-site writes: any page can make the browser POST a form to http://127.0.0.1:8000. On every deployment,
  a POST, PUT, PATCH or DELETE (and a WebSocket handshake) whose ``Origin`` header is not the request's own
  origin (scheme://host:port, from the Host header) is answered 403. Requests without Origin (curl, scripts,
  SDKs) are not browsers' cross-site requests and pass. Behind a TLS-terminating proxy the scheme comes from
  ``X-Forwarded-Proto``: a cross-site page cannot add that header (it would need a CORS preflight, which this
  server never grants).

Pure ASGI, so streamed responses (SSE, downloads) and WebSockets pass through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (lowercase name without brackets or trailing dot, port or None); None when malformed.
    'LocalHost:8000' → ('localhost', 8000), '[::1]' → ('::1', None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        if value.count(":") > 1:   # an IPv6 address must be bracketed in a Host header
            return None
        name, _, port = value.partition(":")
    name = name.rstrip(".")
    if not name or (port and not port.isdigit()) or (port and int(port) > 65535):
        return None
    return name, int(port) if port else None


def is_loopback_name(name: str) -> bool:
    return name in LOOPBACK_NAMES or (name.startswith("127.") and name.replace(".", "").isdigit())


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin header; None for 'null' or anything malformed."""
    try:
        parts = urlsplit(url.strip())
        scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    return (scheme, host, port) if scheme in DEFAULT_PORTS and host and port else None


def _duplicate_host(scope: dict) -> tuple[int, str] | None:
    """Two Host headers: the checks below would read only the first, the application or a proxy maybe another."""
    if sum(1 for name, _ in scope.get("headers", ()) if name.lower() == b"host") > 1:
        return 400, "more than one Host header: a request names one host"
    return None


class RequestGuard:
    """ASGI middleware: the Host check (when ``allowed_hosts`` is given) and the Origin check (always)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] | None = None):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.strip().lower().strip("[]").rstrip(".")
                                                                 for h in allowed_hosts if h.strip()}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = (_duplicate_host(scope) or self._host_problem(headers)
                   or self._origin_problem(scope, headers))
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)
        else:   # closing before accepting: the server answers the handshake with 403
            await send({"type": "websocket.close", "code": 1008, "reason": problem[1]})

    def _host_problem(self, headers: Headers) -> tuple[int, str] | None:
        if self.allowed_hosts is None:
            return None
        host = split_host(headers.get("host", ""))
        if host is None or not (is_loopback_name(host[0]) or host[0] in self.allowed_hosts):
            return 400, ("Host not allowed: without API keys this server answers only to loopback names "
                         "(localhost, 127.0.0.1, [::1]), USF_HOST and USF_ALLOWED_HOSTS")
        return None

    def _origin_problem(self, scope: dict, headers: Headers) -> tuple[int, str] | None:
        origin = headers.get("origin")
        if origin is None or (scope["type"] == "http" and scope["method"] not in UNSAFE_METHODS):
            return None
        scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if scheme not in DEFAULT_PORTS:
            scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        host = split_host(headers.get("host", ""))
        own = None if host is None else (scheme, host[0], host[1] or DEFAULT_PORTS.get(scheme))
        if own is None or _origin_of(origin) != own:
            return 403, (f"cross-origin request refused: Origin {origin!r} is not this server's origin; "
                         "requests from other web sites may not change anything here")
        return None
