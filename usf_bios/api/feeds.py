"""Live job feeds for the SSE and WebSocket routes: one poller per watched job, however many streams watch it.

A ``JobFeed`` reads the job's new events (``engine.events.read_events`` from its byte offset) and its status row
every ``POLL_S`` in a worker thread, and hands both to every subscriber's queue; it stops when the job is final
or nobody watches. A new subscriber first gets what the file holds between its own offset and the feed's, so a
reconnect with Last-Event-ID misses nothing and gets nothing twice. 200 watchers of one job cost one file read and
one small query per poll, not 200, and no stream holds a database connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Union

from fastapi.concurrency import run_in_threadpool

from usf_bios.control import jobs
from usf_bios.control.schemas import JobStatusPublic
from usf_bios.control.tables import Job
from usf_bios.engine.events import Event, iter_events, read_events_at

POLL_S = 0.25
KEEPALIVE_S = 15.0    # a stream with nothing to say sends a comment this often (proxies close idle streams)
QUEUE_LIMIT = 10_000  # a subscriber this far behind is dropped (it reconnects with Last-Event-ID)

Item = tuple[Union[int, str], Union[Event, JobStatusPublic, None]]   # (end offset, event) | ("status", s) | ("keepalive", None)


@dataclass
class JobFeed:
    app: Any
    job_id: str
    offset: int = 0                              # where the next poll reads the events file from
    last_status: JobStatusPublic | None = None   # the newest status row sent
    final: bool = False
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None

    async def run(self) -> None:
        path = self.app.state.layout.job_events(self.job_id)
        try:
            while self.subscribers:
                events, offset = await run_in_threadpool(read_events_at, path, self.offset)
                status = await run_in_threadpool(_status_row, self.app, self.job_id)
                for end, event in events:
                    self._publish((end, event))
                self.offset = offset
                if status is not None and status != self.last_status:
                    self.last_status = status
                    self._publish(("status", status))
                if status is None or status.status.is_terminal:
                    self.final = True
                    self._publish(("end", None))
                    return
                await asyncio.sleep(POLL_S)
        finally:
            feeds: dict[str, JobFeed] = self.app.state.feeds
            if feeds.get(self.job_id) is self:
                del feeds[self.job_id]

    def _publish(self, item: Item) -> None:
        for queue in list(self.subscribers):
            if queue.qsize() >= QUEUE_LIMIT:
                self.subscribers.discard(queue)
                queue.put_nowait(("end", None))
            else:
                queue.put_nowait(item)


def _status_row(app: Any, job_id: str) -> JobStatusPublic | None:
    with app.state.db.session() as session:
        job = session.get(Job, job_id)
        return None if job is None else jobs.job_status(job)


async def follow_job(app: Any, job_id: str, since: int) -> AsyncIterator[Item]:
    """Everything of the job after byte ``since`` (-1: from the start), then its events and status changes as they
    come, with ('keepalive', None) after KEEPALIVE_S of silence, until the job is final."""
    feeds: dict[str, JobFeed] = app.state.feeds
    feed = feeds.get(job_id)
    if feed is None or feed.final:
        feed = feeds[job_id] = JobFeed(app, job_id)
    queue: asyncio.Queue = asyncio.Queue()
    caught_up_to, status = feed.offset, feed.last_status   # read and subscribed in one step of the event loop
    feed.subscribers.add(queue)
    if feed.task is None:
        feed.task = asyncio.create_task(feed.run())
    try:
        start = max(since, 0)
        if start < caught_up_to:
            path = app.state.layout.job_events(job_id)
            earlier = await run_in_threadpool(lambda: [item for item in iter_events(path, start) if item[0] <= caught_up_to])
            for item in earlier:
                yield item
        if status is not None:
            yield "status", status
        while True:
            try:
                key, value = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield "keepalive", None
                continue
            if key == "end":
                return
            if isinstance(key, int) and key <= max(since, caught_up_to):
                continue   # already sent from the file
            yield key, value
    finally:
        feed.subscribers.discard(queue)
