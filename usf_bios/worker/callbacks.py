"""The worker's callbacks: each status change, the metric points (batched, at most one request every
USF_CALLBACK_INTERVAL_S) and the completion (with the artifact's size and sha256) POSTed to the job's
callback_url, signed (``X-USF-Signature``, usf_bios/signing.py) and named (``X-USF-Event-Id``, the same on every
retry, so the receiver applies each once).

One thread sends them, apart from the engines: a slow or dead receiver never slows training. A callback that
fails is retried with exponential back-off up to ``MAX_TRIES`` times, then given up (the control plane polls
/training/status and /training/events as well, so nothing is lost); what was delivered is recorded in the
worker's store, so a restarted worker continues where it was.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx
from sqlalchemy import select

from usf_bios.control.tables import WorkerSubmission
from usf_bios.engine.events import read_events_at
from usf_bios.netguard import BlockedURL, post_json
from usf_bios.signing import sign_callback
from usf_bios.worker.contract import CallbackBody, SequencedEvent
from usf_bios.worker.service import WorkerService

log = logging.getLogger("usf_bios.worker.callbacks")
MAX_TRIES = 6              # 1 + 2 + 4 + 8 + 16 s of waiting, then the callback is given up
MAX_EVENTS_PER_CALLBACK = 500
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Pending:
    body: bytes
    event_id: str
    offset: int            # the events offset once delivered
    status: str            # the status once delivered
    tries: int = 0
    next_try: float = 0.0


class CallbackSender:
    def __init__(self, service: WorkerService, tick_s: float = 0.5):
        self.service, self.settings, self.tick_s = service, service.settings, tick_s
        self._pending: dict[str, Pending] = {}
        self._last_metrics: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.settings.callback_secret:
            log.warning("USF_CALLBACK_SECRET is unset: callbacks are not sent (the control plane polls)")
            return
        self._thread = threading.Thread(target=self._run, name="usf-callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:   # a bad tick must not stop the callbacks
                log.exception("callback tick failed")
            self._stop.wait(self.tick_s)

    def tick(self) -> None:
        with self.service.db.session() as session:
            subs = session.scalars(select(WorkerSubmission).where(WorkerSubmission.callback_url.is_not(None))).all()
            due = [(s.id, s.callback_url, s.callback_offset, s.callback_status) for s in subs
                   if s.callback_status not in TERMINAL]
        for external_id, url, offset, sent_status in due:
            if self._stop.is_set():
                return
            pending = self._pending.get(external_id) or self._next(external_id, offset, sent_status)
            if pending is None or pending.next_try > time.monotonic():
                continue
            self._pending[external_id] = pending
            self._deliver(external_id, url, pending)

    def _next(self, external_id: str, offset: int, sent_status: str | None) -> Pending | None:
        """The job's next callback, if one is due: a status change (with the events so far), else a batch of
        metric points once the interval has passed."""
        status = self.service.status(external_id)
        pairs, end = read_events_at(self.service.layout.job_events(external_id), offset)
        more = len(pairs) > MAX_EVENTS_PER_CALLBACK
        if more:
            pairs, end = pairs[:MAX_EVENTS_PER_CALLBACK], pairs[MAX_EVENTS_PER_CALLBACK - 1][0]
        if not pairs:
            end = offset
        changed = status.status != sent_status and not more
        if changed and status.status == "completed" and status.artifact is None:
            return None
        if not changed:
            if not pairs or time.monotonic() - self._last_metrics.get(external_id, 0.0) < self.settings.callback_interval_s:
                return None
        kind = ("completed" if status.status == "completed" else "status") if changed else "metrics"
        event_id = f"{external_id}:{kind}:{offset}-{end}:{status.status}"
        body = CallbackBody(kind=kind, event_id=event_id, status=status, after=offset,
                            events=[SequencedEvent(seq=seq, event=e.model_dump(mode="json")) for seq, e in pairs])
        return Pending(body.model_dump_json().encode(), event_id, end, status.status if changed else (sent_status or ""))

    def _deliver(self, external_id: str, url: str, pending: Pending) -> None:
        headers = {"X-USF-Signature": sign_callback(self.settings.callback_secret or "", pending.body),
                   "X-USF-Event-Id": pending.event_id}
        try:
            code = post_json(url, pending.body, headers=headers, allowed_hosts=self.settings.worker_allowed_hosts)
            delivered = 200 <= code < 300
            reason = f"answered {code}"
        except (httpx.HTTPError, BlockedURL, OSError) as err:
            delivered, reason = False, str(err) or type(err).__name__
        pending.tries += 1
        if delivered or pending.tries >= MAX_TRIES:
            if not delivered:
                log.warning("callback %s given up after %d tries (%s); the control plane polls", pending.event_id,
                            pending.tries, reason)
            self._record(external_id, pending)
            return
        pending.next_try = time.monotonic() + 2 ** (pending.tries - 1)

    def _record(self, external_id: str, pending: Pending) -> None:
        self._pending.pop(external_id, None)
        if pending.event_id.split(":")[1] == "metrics":
            self._last_metrics[external_id] = time.monotonic()
        with self.service.db.session() as session:
            sub = session.get(WorkerSubmission, external_id)
            if sub is not None:
                sub.callback_offset = pending.offset
                if pending.status:
                    sub.callback_status = pending.status
                session.commit()
