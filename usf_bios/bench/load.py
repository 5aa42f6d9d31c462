"""A load test of a running server, on loopback only: many concurrent keep-alive clients, each sending a bounded
number of requests, and SSE watchers that count the events they get.

``python -m usf_bios.bench.load --port 8000 --clients 200 --requests 20 --path /api/jobs`` prints the answers by
status, errors and latency percentiles as JSON. The client is a few lines of asyncio HTTP/1.1 (no HTTP library),
so that 200 clients on a 2-core machine measure the server, not the client. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

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


def _request(path: str, host: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: keep-alive\r\n\r\n".encode()


class _Connection(asyncio.Protocol):
    """One keep-alive connection as a bare protocol: a request is written whole, its answer is the status line,
    the headers and Content-Length bytes of body (every answer the load routes give has one). No pipelining: the
    next request goes out after the previous answer. Bare on purpose: with asyncio streams and ``wait_for`` the
    200 clients cost about as much CPU as the server they measure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.waiter.set_exception(ValueError("an answer without Content-Length"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end > 0 else None])
        if len(self.buffer) >= end + 4 + length:
            status = int(head[9:12])
            del self.buffer[:end + 4 + length]
            self.waiter.set_result(status)

    async def ask(self, request: bytes, timeout: float) -> int:
        if self.lost is not None:
            raise self.lost
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, lambda w=self.waiter: w.done() or w.set_exception(TimeoutError()))
        self.transport.write(request)  # type: ignore[union-attr]
        try:
            return await self.waiter
        finally:
            timer.cancel()


async def _client(host: str, port: int, path: str, requests: int, key: str | None, timeout: float,
                  result: LoadResult, interval: float) -> None:
    loop = asyncio.get_running_loop()
    request = _request(path, host, key)
    connection: _Connection | None = None
    for number in range(requests):
        if interval and number:
            await asyncio.sleep(interval)
        started = time.perf_counter()
        try:
            if connection is None:
                _, connection = await asyncio.wait_for(loop.create_connection(_Connection, host, port), timeout)
            status = await connection.ask(request, timeout)
            result.statuses[status] += 1
            result.latencies.append(time.perf_counter() - started)
        except (asyncio.TimeoutError, TimeoutError):
            result.errors["timeout"] += 1
            connection = _close(connection)
        except (OSError, ValueError) as err:
            result.errors[type(err).__name__] += 1
            connection = _close(connection)
    _close(connection)


def _close(connection: _Connection | None) -> None:
    if connection is not None and connection.transport is not None:
        connection.transport.close()
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


def run_loop(coroutine: Any) -> Any:
    """``asyncio.run`` on uvloop when it is installed (a cheaper client), else on asyncio's own loop. What the
    process holds already is frozen first: a full garbage collection over a process that imported torch pauses
    every client for ~100 ms, which would be counted as the server's latency."""
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


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
    result = run_loop(hammer(args.host, args.port, args.path, args.clients, args.requests, args.key, args.timeout))
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
