"""The two answers asked for most, kept ready: who an API key is, and a page of the job list.

Under 200 concurrent clients the job list cost ~15 ms a request (two queries, 50 rows through pydantic twice, FastAPI's
dependency resolution) and the key lookup another query, so the server answered ~60 times a second. Here:

- ``ReadCache`` keeps a value for the ``Database.generation`` it was read in (control/db.py: it changes after every
  commit of this process that wrote something) and for at most ``MAX_AGE_S`` seconds: a change made through this
  server is seen by the next request, at once; a change made by another process on the same database (a second
  server on one USF_HOME, `usf-bios keys revoke`) within ``MAX_AGE_S`` (a max age rather than SQLite's ``PRAGMA
  data_version``: the same bound on SQLite and PostgreSQL, and no query per request). A value being read is read
  once, whoever asks meanwhile waits for that one read (no stampede of 200 reads when an entry goes stale); past
  half its age a value is read again in the background while it is still handed out.
- A key is cached by its SHA-256, and only when it is valid: an unknown key is looked up every time (a key created a
  moment ago works at once), a revoked key is refused by the next request (revoked here) or within ``MAX_AGE_S``.
- ``FastReads`` (pure ASGI, after the Host/Origin guard) answers ``GET /api/health`` and ``GET /api/jobs`` with
  the same bytes FastAPI would send, without routing; anything it does not recognise — no key or a refused one,
  unknown or malformed query parameters, a failed read — goes on to the application, which answers as it always
  did (the 401s, 422s and 503s are the application's). The job list's route uses the same cache.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi.concurrency import run_in_threadpool

from usf_bios import __version__
from usf_bios.api.bodies import bearer
from usf_bios.control.db import Database
from usf_bios.control.jobs import MAX_LIST, find_jobs
from usf_bios.control.keys import LOCAL_USER, Caller, caller_for_key, hash_key
from usf_bios.control.schemas import Health
from usf_bios.status import JobStatus

MAX_AGE_S = 1.0      # the longest a change made by another process stays unseen
MAX_ENTRIES = 1024   # per cache; the oldest entry goes first
JOB_LIST_PARAMS = frozenset({"status", "limit", "offset"})
MAX_OFFSET = 2**31 - 1   # the route's bound (api/routes/jobs.py)


@dataclass
class _Entry:
    value: Any
    generation: int
    read_at: float


@dataclass
class _Read:
    generation: int
    started: float
    task: asyncio.Future


class ReadCache:
    """Values by key, each valid for the database generation it was read in and for ``max_age_s`` seconds from
    when its read began; past half that age a value is still handed out while one read in the background
    replaces it, so under steady load nobody waits for a refresh."""

    def __init__(self, db: Database, max_age_s: float = MAX_AGE_S, max_entries: int = MAX_ENTRIES):
        self.db, self.max_age_s, self.max_entries = db, max_age_s, max_entries
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.reads: dict[Hashable, _Read] = {}

    def get(self, key: Hashable) -> Any | None:
        entry = self.entries.get(key)
        if entry is None or entry.generation != self.db.generation or time.monotonic() - entry.read_at > self.max_age_s:
            return None
        return entry.value

    async def fetch(self, key: Hashable, read: Callable[[], Any]) -> Any:
        """The cached value, else ``read()`` in a worker thread, once for all who ask meanwhile. A ``None`` is
        handed back and not kept."""
        value = self.get(key)
        if value is not None:
            if time.monotonic() - self.entries[key].read_at > self.max_age_s / 2:
                self._read(key, read)   # in the background: this value is still young enough
            return value
        return await asyncio.shield(self._read(key, read))

    def _read(self, key: Hashable, read: Callable[[], Any]) -> asyncio.Future:
        """The read of ``key`` under way since the latest change, or a new one."""
        generation = self.db.generation   # before the read: a change during it makes the value stale at once
        pending = self.reads.get(key)
        if pending is None or pending.generation != generation:   # a read begun before the latest change won't do
            pending = _Read(generation, time.monotonic(), asyncio.ensure_future(run_in_threadpool(read)))
            self.reads[key] = pending
            pending.task.add_done_callback(lambda _task, key=key, pending=pending: self._keep(key, pending))
        return pending.task

    def _keep(self, key: Hashable, pending: _Read) -> None:
        if self.reads.get(key) is pending:
            del self.reads[key]
        task = pending.task
        if task.cancelled() or task.exception() is not None:   # the next request reads again
            return
        current = self.entries.get(key)
        if current is not None and current.read_at > pending.started:   # a later read finished first
            return
        if task.result() is None:   # e.g. a key revoked meanwhile: what was kept goes too
            self.entries.pop(key, None)
            return
        self.entries[key] = _Entry(task.result(), pending.generation, pending.started)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


class Reads:
    """The app's cached reads (``app.state.reads``): callers by key, job-list pages by caller and query."""

    def __init__(self, db: Database):
        self.db = db
        self.callers = ReadCache(db)
        self.job_pages = ReadCache(db)

    async def caller(self, key: str) -> Caller | None:
        """The caller a presented key stands for; None for an unknown or revoked key."""
        def lookup() -> Caller | None:
            with self.db.session() as session:
                return caller_for_key(session, key)

        return await self.callers.fetch(hash_key(key), lookup)

    async def job_page(self, caller: Caller, status: JobStatus | None, limit: int, offset: int) -> bytes:
        """``GET /api/jobs`` as JSON bytes: what FastAPI makes of the route's JobsPublic (pydantic's dump_json)."""
        def read() -> bytes:
            with self.db.session() as session:
                page = find_jobs(session=session, caller=caller, statuses=None if status is None else [status],
                                 limit=limit, offset=offset)
            return page.model_dump_json(by_alias=True).encode()

        return await self.job_pages.fetch((caller.key_id, caller.is_admin, status, limit, offset), read)


def job_list_query(query_string: bytes) -> tuple[JobStatus | None, int, int] | None:
    """(status, limit, offset) of a job list's query string when every parameter is known, given once and valid;
    else None (the route then answers, with its 422 where one is due)."""
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=bool(query_string))
    except ValueError:
        return None
    params = dict(pairs)
    if len(params) != len(pairs) or not params.keys() <= JOB_LIST_PARAMS:
        return None
    numbers = {}
    for name, default, low, high in (("limit", 50, 1, MAX_LIST), ("offset", 0, 0, MAX_OFFSET)):
        text = params.get(name, str(default))
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            return None
        numbers[name] = int(text)
    status = params.get("status")
    if status is not None and status not in JobStatus._value2member_map_:
        return None
    return (None if status is None else JobStatus(status)), numbers["limit"], numbers["offset"]


HEALTH = Health(version=__version__).model_dump_json(by_alias=True).encode()


class FastReads:
    """ASGI middleware: ``GET /api/health`` and ``GET /api/jobs`` answered from ``app.state.reads`` without
    FastAPI's routing; everything else, and whatever it cannot answer itself, goes on to the application."""

    def __init__(self, app: Any, auth_required: bool):
        self.app, self.auth_required = app, auth_required

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/api/health":
                await _send_json(send, HEALTH)
                return
            if scope["path"] == "/api/jobs":
                page = await self._job_page(scope)
                if page is not None:
                    await _send_json(send, page)
                    return
        await self.app(scope, receive, send)

    async def _job_page(self, scope: dict) -> bytes | None:
        query = job_list_query(scope.get("query_string", b""))
        if query is None:
            return None
        key = bearer(next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None))
        reads: Reads = scope["app"].state.reads   # Starlette puts the application in the scope
        try:
            caller = LOCAL_USER if key is None and not self.auth_required else (
                None if key is None else await reads.caller(key))
            return None if caller is None else await reads.job_page(caller, *query)
        except Exception:   # the application reads again and answers the way it answers a failure (a 503)
            return None


async def _send_json(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
