"""Outbound fetches behind an SSRF guard: the worker's dataset download (and any URL a request hands us).

Only http and https. The host is resolved once and every address it has is checked: loopback, private (RFC 1918,
ULA), link-local (cloud metadata at 169.254.169.254 among them), multicast, unspecified, reserved, shared
(100.64/10), IPv4-mapped and other non-global IPv6 forms are refused — unless the URL's host name is listed in
``allowed_hosts`` (``USF_WORKER_ALLOWED_HOSTS``). Numeric spellings such as ``2130706433`` or ``0x7f.1`` resolve
to the address they stand for and are judged by it. The connection then goes to the address that was checked
(the URL is rewritten to it, with the original Host header and TLS server name), so a second DNS answer cannot
swap it. Redirects are followed by hand, at most ``MAX_REDIRECTS``, each judged the same way. The body streams to
disk under a byte cap, with its sha256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

MAX_REDIRECTS = 5
CHUNK = 1 << 16


class BlockedURL(ValueError):
    """The URL may not be fetched (scheme, host, address or size); the message says why."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    size_bytes: int
    sha256: str
    filename: str   # from Content-Disposition, else the URL's last path segment (may be empty)


def _refused_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if mapped is not None:
            return _refused_reason(mapped) or "IPv4 address wrapped in IPv6"
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return f"{name.replace('_', '-')} address"
    if not address.is_global:
        return "not a public address"
    return None


def resolve_checked(host: str, port: int, allowed_hosts: Iterable[str] = ()) -> str:
    """The address to connect to for ``host``; BlockedURL when any of its addresses is not public (unless the host
    is allowed)."""
    if not host:
        raise BlockedURL("the URL has no host")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise BlockedURL(f"cannot resolve host {host!r}: {err}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise BlockedURL(f"host {host!r} has no address")
    if host.lower().strip("[]") not in {h.lower() for h in allowed_hosts}:
        for raw in addresses:
            reason = _refused_reason(ipaddress.ip_address(raw.split("%", 1)[0]))
            if reason:
                raise BlockedURL(f"host {host!r} resolves to {raw} ({reason}); fetching it is refused "
                                 f"(list the host in USF_WORKER_ALLOWED_HOSTS to allow it)")
    return addresses[0]


def _pinned(url: str, allowed_hosts: Iterable[str]) -> tuple[str, str, str]:
    """(the URL rewritten to the checked address, the Host header, the TLS server name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BlockedURL(f"only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}")
    if parts.username or parts.password:
        raise BlockedURL("URLs with credentials in them are refused")
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BlockedURL(f"the URL's port is not a number: {parts.netloc!r}") from None
    address = resolve_checked(host, port, allowed_hosts)
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host_header, host


def _filename(headers: httpx.Headers, url: str) -> str:
    disposition = headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip('"')
    return urlsplit(url).path.rsplit("/", 1)[-1]


def post_json(url: str, body: bytes, *, headers: dict[str, str], allowed_hosts: Iterable[str] = (),
              timeout_s: float = 5.0) -> int:
    """POST ``body`` (JSON) to ``url`` under the guard, following no redirect; the status code. BlockedURL for a
    refused URL, httpx.HTTPError when the receiver cannot be reached."""
    pinned, host_header, server_name = _pinned(url, tuple(allowed_hosts))
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        request = client.build_request("POST", pinned, content=body, extensions={"sni_hostname": server_name},
                                       headers={**headers, "Host": host_header, "Content-Type": "application/json"})
        return client.send(request).status_code


def put_stream(url: str, body: Iterable[bytes], *, headers: dict[str, str], allowed_hosts: Iterable[str] = (),
               timeout_s: float = 600.0) -> int:
    """PUT a streamed body to ``url`` under the guard, following no redirect; the status code."""
    pinned, host_header, server_name = _pinned(url, tuple(allowed_hosts))
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        request = client.build_request("PUT", pinned, content=body, extensions={"sni_hostname": server_name},
                                       headers={**headers, "Host": host_header})
        return client.send(request).status_code


def fetch_to_file(url: str, dest: Path, *, max_bytes: int, allowed_hosts: Iterable[str] = (),
                  timeout_s: float = 60.0, headers: dict[str, str] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> Fetched:
    """Stream ``url`` into ``dest`` (written whole or not at all) under the guard; BlockedURL for a refused URL or
    a body past ``max_bytes``, httpx.HTTPError for a failed transfer."""
    allowed = tuple(allowed_hosts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            pinned, host_header, server_name = _pinned(url, allowed)
            request = client.build_request("GET", pinned, headers={**(headers or {}), "Host": host_header},
                                           extensions={"sni_hostname": server_name})
            response = client.send(request, stream=True)
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if not location:
                        raise BlockedURL("a redirect without a Location header")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise httpx.HTTPStatusError(f"GET {urlsplit(url).path} answered {response.status_code}",
                                                request=request, response=response)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise BlockedURL(f"the file is {int(declared)} bytes, over the {max_bytes}-byte limit")
                digest, size = hashlib.sha256(), 0
                try:
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes(CHUNK):
                            size += len(chunk)
                            if size > max_bytes:
                                raise BlockedURL(f"the file is over the {max_bytes}-byte limit; the download was cut off")
                            digest.update(chunk)
                            out.write(chunk)
                            if on_progress:
                                on_progress(size)
                        out.flush()
                        os.fsync(out.fileno())
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
                partial.replace(dest)
                return Fetched(dest, size, digest.hexdigest(), _filename(response.headers, url))
            finally:
                response.close()
    raise BlockedURL(f"more than {MAX_REDIRECTS} redirects")
