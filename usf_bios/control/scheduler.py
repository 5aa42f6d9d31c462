"""The scheduler: starts queued jobs when their GPUs (or a CPU slot) are free, follows running ones,
finishes them from their events, cancels on request, and recovers after a restart.

It runs as one background thread of the server. Every status change goes through control.lifecycle.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from usf_bios.control import lifecycle
from usf_bios.control.db import Database
from usf_bios.control.executors.local import LocalExecutor, ProcessRef
from usf_bios.control.follow import apply_events, read_new_events
from usf_bios.control.gpus import list_gpus
from usf_bios.control.lifecycle import JobStatus
from usf_bios.control.tables import Artifact, Job
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout

log = logging.getLogger("usf_bios.scheduler")
ACTIVE = [s.value for s in JobStatus if s.is_active]


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Scheduler:
    def __init__(self, db: Database, layout: StorageLayout, settings: Settings, executor: LocalExecutor | None = None):
        self.db, self.layout, self.settings = db, layout, settings
        self.executor = executor or LocalExecutor(layout, settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._terminated: set[str] = set()   # jobs sent SIGTERM by this process
        self._gpu_count: int | None = None

    # -- thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usf-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Look again now (a job was queued or cancelled)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad tick must not stop the scheduler
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    # -- one pass ----------------------------------------------------------------------------------
    def tick(self) -> None:
        with self.db.session() as session:
            for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.created_at)).all():
                self._follow(session, job)
                session.commit()
            self._start_queued(session)

    def _ref(self, job: Job) -> ProcessRef | None:
        return ProcessRef(job.pid, job.pid_start_time or "") if job.pid else None

    def _follow(self, session: Session, job: Job) -> None:
        done = apply_events(session, job, read_new_events(self.layout, job))
        ref = self._ref(job)
        if done is not None:
            self._finish(session, job, done)
        elif ref is None or not self.executor.is_alive(ref):
            self._lost(job, ref)
        elif job.status == JobStatus.CANCELLING.value:
            self._cancel_signals(job, ref)
        if ref is not None and JobStatus(job.status).is_terminal:
            self.executor.forget(ref)

    def _finish(self, session: Session, job: Job, done: dict) -> None:
        status = done.get("status")
        if status == "completed":
            lifecycle.mark_completed(job)
            self._record_artifact(session, job)
        elif status == "cancelled":
            lifecycle.mark_cancelled(job)
        else:
            lifecycle.mark_failed(job, done.get("error") or "the engine reported a failure")

    def _lost(self, job: Job, ref: ProcessRef | None) -> None:
        """The process is gone without a 'done' event."""
        if job.status == JobStatus.CANCELLING.value:
            lifecycle.mark_cancelled(job)
            return
        code = self.executor.exit_code(ref) if ref else None
        reason = "the job's process ended without a word" + (f" (exit status {code})" if code is not None else "")
        lifecycle.mark_interrupted(job, reason)
        if job.attempts < job.max_attempts:
            lifecycle.requeue(job)
            log.warning("job %s interrupted (%s); queued again to resume", job.id, reason)
        else:
            lifecycle.mark_failed(job, f"{reason}; gave up after {job.attempts} attempts")

    def _cancel_signals(self, job: Job, ref: ProcessRef) -> None:
        if job.id not in self._terminated:
            self.executor.send_signal(ref, signal.SIGTERM)
            self._terminated.add(job.id)
        requested = _utc(job.cancel_requested_at or datetime.now(timezone.utc))
        if (datetime.now(timezone.utc) - requested).total_seconds() > self.settings.cancel_grace_s:
            self.executor.send_signal(ref, signal.SIGKILL)

    def _record_artifact(self, session: Session, job: Job) -> None:
        folder = self.layout.job_output(job.id)
        same_owner = (Artifact.owner_key_id.is_(None) if job.owner_key_id is None
                      else Artifact.owner_key_id == job.owner_key_id)
        latest = session.scalar(select(func.max(Artifact.version)).where(Artifact.name == job.name, same_owner))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        session.add(Artifact(job_id=job.id, name=job.name, version=(latest or 0) + 1, path=str(folder),
                             size_bytes=size, owner_key_id=job.owner_key_id))

    # -- starting ----------------------------------------------------------------------------------
    def _gpus(self) -> int:
        if self._gpu_count is None:
            self._gpu_count = len(list_gpus())
        return self._gpu_count

    def _start_queued(self, session: Session) -> None:
        queued = session.scalars(select(Job).where(Job.status == JobStatus.QUEUED.value).order_by(Job.created_at)).all()
        if not queued:
            return
        active = session.scalars(select(Job).where(Job.status.in_(ACTIVE))).all()
        cpu_jobs = sum(1 for j in active if j.num_gpus == 0)
        busy = {int(i) for j in active if j.gpu_ids for i in j.gpu_ids.split(",")}
        for job in queued:
            if job.num_gpus == 0:
                if cpu_jobs >= self.settings.max_cpu_jobs:
                    continue
                gpu_ids: list[int] = []
                cpu_jobs += 1
            else:
                if job.num_gpus > self._gpus():
                    lifecycle.mark_preparing(job)
                    lifecycle.mark_failed(job, f"the job needs {job.num_gpus} GPU(s); this host has {self._gpus()}")
                    session.commit()
                    continue
                free = [i for i in range(self._gpus()) if i not in busy]
                if len(free) < job.num_gpus:
                    continue
                gpu_ids = free[:job.num_gpus]
                busy.update(gpu_ids)
            self._launch(session, job, gpu_ids)

    def _launch(self, session: Session, job: Job, gpu_ids: list[int]) -> None:
        lifecycle.mark_preparing(job)
        session.commit()
        try:
            ref = self.executor.start(job.id, gpu_ids)
        except OSError as err:
            lifecycle.mark_failed(job, f"could not start the engine: {err}")
            session.commit()
            return
        self._terminated.discard(job.id)
        lifecycle.mark_running(job, ref.pid, ref.start_time, ",".join(map(str, gpu_ids)))
        session.commit()
        log.info("job %s started (pid %s, gpus [%s])", job.id, ref.pid, job.gpu_ids)
