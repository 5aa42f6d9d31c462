"""HMAC signatures: the worker's callbacks (``X-USF-Signature``) and the control plane's expiring dataset URLs.

A callback is signed as Stripe-style webhooks are: ``t=<unix seconds>,v1=<hex HMAC-SHA256("<t>.<raw body>")>``;
the receiver recomputes it over the exact bytes it got, compares in constant time and refuses a ``t`` outside its
window (a replay later than that fails even with a valid signature). A signed URL carries ``expires`` (unix
seconds) and ``sig`` = HMAC-SHA256 over ``"<path>\\n<expires>"``, so it opens that one path until then.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

CALLBACK_WINDOW_S = 300


def _mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _matches(expected: str, given: str) -> bool:
    """``given`` is the hex MAC ``expected``, compared in constant time; anything but 64 hex digits (a non-ASCII
    character among them, which ``compare_digest`` would refuse with a TypeError) does not match."""
    return len(given) == 64 and all(c in "0123456789abcdefABCDEF" for c in given) and \
        hmac.compare_digest(expected.encode(), given.encode())


def sign_callback(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-USF-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, str(t).encode() + b'.' + body)}"


def verify_callback(secret: str, header: str | None, body: bytes, *, now: float | None = None,
                    window_s: int = CALLBACK_WINDOW_S) -> str | None:
    """None when ``header`` signs ``body`` within the window; else why not (for the receiver's log, not the
    sender)."""
    if not header:
        return "no X-USF-Signature header"
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    t, given = parts.get("t", ""), parts.get("v1", "")
    if not (t.isascii() and t.isdigit()) or not given:
        return "malformed X-USF-Signature header"
    if abs((time.time() if now is None else now) - int(t)) > window_s:
        return f"timestamp outside the {window_s} s window"
    if not _matches(_mac(secret, t.encode() + b"." + body), given):
        return "signature does not match"
    return None


def sign_url_path(secret: str, path: str, expires: int) -> str:
    return _mac(secret, f"{path}\n{expires}".encode())


def verify_url_path(secret: str, path: str, expires: str | None, sig: str | None, *,
                    now: float | None = None) -> str | None:
    """None when ``sig`` opens ``path`` and ``expires`` has not passed; else why not."""
    if not expires or not sig or not (expires.isascii() and expires.isdigit()):
        return "the URL carries no valid expires and sig"
    if int(expires) < (time.time() if now is None else now):
        return "the signed URL has expired"
    if not _matches(sign_url_path(secret, path, int(expires)), sig):
        return "the signature does not match this URL"
    return None


def stored_secret(path: Path) -> str:
    """A random secret kept in ``path`` (created once, mode 0600), for a server that was given none."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(value)
    tmp.replace(path)
    return path.read_text().strip()
