"""A load test of a running server, on loopback only: many concurrent keep-alive clients, each sending a bounded
number of requests, and SSE watchers that count the events they get.

``python -m usf_bios.bench.load --port 8000 --clients 200 --requests 20 --path /api/jobs`` prints the answers by
status, errors and latency percentiles as JSON. The client is a few lines of asyncio HTTP/1.1 (no HTTP library),
so that 200 clients on a 2-core machine measure the server, not the client. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    def summary(self) -> dict:
        total = sum(self.statuses.values())
        return {"answers": dict(self.statuses), "errors": dict(self.errors), "requests": total + sum(self.errors.values()),
                "seconds": round(self.seconds, 2), "per_second": round(total / self.seconds, 1) if self.seconds else None,
                **{f"p{p}_ms": None if self.percentile(p) is None else round(self.percentile(p) * 1000, 1)
                   for p in (50, 90, 99)}}


def _check_loopback(host: str) -> None:
    if host not in LOOPBACK and not host.startswith("127."):
        raise ValueError(f"the load test sends traffic to loopback addresses only, not {host}")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return status, body


def _request(path: str, host: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: keep-alive\r\n\r\n".encode()


async def _client(host: str, port: int, path: str, requests: int, key: str | None, timeout: float,
                  result: LoadResult, interval: float) -> None:
    reader = writer = None
    for number in range(requests):
        if interval and number:
            await asyncio.sleep(interval)
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(_request(path, host, key))
            status, _ = await asyncio.wait_for(_read_response(reader), timeout)  # type: ignore[arg-type]
            result.statuses[status] += 1
            result.latencies.append(time.perf_counter() - started)
        except (asyncio.TimeoutError, TimeoutError):
            result.errors["timeout"] += 1
            writer = _close(writer)
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            result.errors[type(err).__name__] += 1
            writer = _close(writer)
    _close(writer)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
    return None


async def hammer(host: str, port: int, path: str, clients: int, requests: int, key: str | None = None,
                 timeout: float = 30.0, interval: float = 0.0) -> LoadResult:
    """``clients`` concurrent keep-alive connections, ``requests`` GETs of ``path`` each, one after the other
    (``interval`` seconds apart: a probe spread over a while rather than a burst)."""
    _check_loopback(host)
    result = LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(_client(host, port, path, requests, key, timeout, result, interval) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class Watch:
    """What one SSE watcher got: engine events by id, keep-alive comments, whether the stream ended by itself."""

    ids: list[int] = field(default_factory=list)
    keepalives: int = 0
    ended: bool = False
    first_byte_s: float | None = None
    error: str | None = None


async def watch_events(host: str, port: int, path: str, seconds: float, key: str | None = None) -> Watch:
    """Follow one SSE stream for at most ``seconds``."""
    _check_loopback(host)
    watch, started = Watch(), time.perf_counter()

    async def follow() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request(path, host, key))
            await reader.readuntil(b"\r\n\r\n")
            watch.first_byte_s = time.perf_counter() - started
            while True:
                line = await reader.readline()
                if not line:
                    watch.ended = True
                    return
                if line.startswith(b": "):
                    watch.keepalives += 1
                elif line.startswith(b"id: "):
                    watch.ids.append(int(line[4:].strip()))
                elif line.strip() == b"0":   # the chunked body's last chunk: the stream ended
                    watch.ended = True
                    return
        finally:
            writer.close()

    try:
        await asyncio.wait_for(follow(), seconds)
    except (asyncio.TimeoutError, TimeoutError):
        pass
    except (OSError, asyncio.IncompleteReadError, ValueError) as err:
        watch.error = type(err).__name__
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--path", default="/api/jobs")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--key", default=None)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    result = asyncio.run(hammer(args.host, args.port, args.path, args.clients, args.requests, args.key, args.timeout))
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
