"""The scheduler: starts queued jobs when their GPUs (or a CPU slot) are free, follows running ones,
finishes them from their events, cancels on request, and recovers after a restart.

It runs as one background thread of the server. Every status change goes through control.lifecycle.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from usf_bios.control import adopt, lifecycle
from usf_bios.control.artifacts import record_artifact
from usf_bios.control.db import Database
from usf_bios.control.executors.base import Executor
from usf_bios.control.executors.local import LocalExecutor
from usf_bios.control.follow import apply_events
from usf_bios.control.lifecycle import JobStatus
from usf_bios.control.tables import Job, as_utc
from usf_bios.engine.events import DoneEvent
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout

log = logging.getLogger("usf_bios.scheduler")
ACTIVE = [s.value for s in JobStatus if s.is_active]


def configured_executors(layout: StorageLayout, settings: Settings) -> dict[str, Executor]:
    """``local`` always; ``remote`` when GPU_CLUSTER_API_URL and GPU_CLUSTER_API_KEY name a worker; ``ray`` when
    USF_EXECUTOR is ray (ExecutorUnavailable when Ray is not installed), or RAY_ADDRESS is set and Ray is."""
    executors: dict[str, Executor] = {"local": LocalExecutor(layout, settings)}
    if settings.gpu_cluster_api_url and settings.gpu_cluster_api_key:
        from usf_bios.control.executors.remote import RemoteExecutor

        executors["remote"] = RemoteExecutor(layout, settings)
    if settings.executor == "ray" or settings.ray_address:
        from usf_bios.control.executors.ray import ExecutorUnavailable, RayExecutor

        try:
            executors["ray"] = RayExecutor(layout, settings)
        except ExecutorUnavailable:
            if settings.executor == "ray":
                raise
            log.warning("RAY_ADDRESS is set but Ray is not installed: jobs with gpu_config.executor: ray fail")
    return executors


class Scheduler:
    def __init__(self, db: Database, layout: StorageLayout, settings: Settings,
                 executors: dict[str, Executor] | None = None, adopt_every: float | None = None):
        self.db, self.layout, self.settings = db, layout, settings
        self.executors: dict[str, Executor] = executors or configured_executors(layout, settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # the server (not a GPU worker) also adopts job folders `usf-bios train` starts while it runs
        self.adopt_every = adopt_every
        self._next_adoption = time.monotonic() + (adopt_every or 0.0)   # the server adopts once at start itself

    # -- thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usf-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)   # a tick is short; SIGTERM must stop the server in seconds

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
        if self.adopt_every and time.monotonic() >= self._next_adoption:
            self._next_adoption = time.monotonic() + self.adopt_every
            try:
                with self.db.session() as session:
                    adopt.adopt_jobs(session=session, layout=self.layout, settings=self.settings)
            except Exception:  # the jobs it already follows come first
                log.exception("adopting job folders failed")
        with self.db.session() as session:
            for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.created_at)).all():
                try:
                    self._follow(session, job)
                    session.commit()
                except StaleDataError:   # written meanwhile (a cancel): followed again, from that, next tick
                    session.rollback()
                    self._wake.set()
            self._start_queued(session)

    def executor(self, job: Job) -> Executor:
        return self.executors[job.executor]

    def _follow(self, session: Session, job: Job) -> None:
        executor = self.executor(job)
        progress = executor.poll(job.handle, job.events_offset, job.id)
        job.events_offset = progress.cursor
        done = apply_events(session, job, progress.events)
        handle = job.handle
        if done is not None:
            self._finish(session, job, done)
        elif not progress.alive:
            self._lost(job, progress.exit_code, progress.lost_reason)
        elif job.status == JobStatus.CANCELLING.value:
            requested = as_utc(job.cancel_requested_at) or datetime.now(timezone.utc)
            waited = (datetime.now(timezone.utc) - requested).total_seconds()
            executor.cancel(handle, kill=waited > self.settings.cancel_grace_s)  # type: ignore[arg-type]
        if handle is not None and JobStatus(job.status).is_terminal:
            executor.forget(handle)

    def _finish(self, session: Session, job: Job, done: DoneEvent) -> None:
        if done.status == JobStatus.COMPLETED:
            lifecycle.mark_completed(job)
            record_artifact(session, self.layout, job)
        elif done.status == JobStatus.CANCELLED:
            if job.status != JobStatus.CANCELLING.value:
                # stopped where no cancel was asked from here (a Ctrl-C in the terminal of an adopted job, SIGTERM
                # from outside, a remote side's own cancel): cancelled as its engine says, through a cancel's steps
                log.info("job %s was stopped from outside (no cancel was asked here); it ended cancelled", job.id)
                lifecycle.mark_cancelling(job)
            lifecycle.mark_cancelled(job)
        else:
            lifecycle.mark_failed(job, done.error or "the engine reported a failure")

    def _lost(self, job: Job, code: int | None, why: str | None = None) -> None:
        """Nothing runs the job any more, and it never said how it ended."""
        if job.status == JobStatus.CANCELLING.value:
            lifecycle.mark_cancelled(job)
            return
        reason = why or "the job's process ended without a word" + (f" (exit status {code})" if code is not None else "")
        lifecycle.mark_interrupted(job, reason)
        if job.attempts < job.max_attempts:
            lifecycle.requeue(job)
            log.warning("job %s interrupted (%s); queued again to resume", job.id, reason)
        else:
            lifecycle.mark_failed(job, f"{reason}; gave up after {job.attempts} attempts")

    # -- starting ----------------------------------------------------------------------------------
    def _start_queued(self, session: Session) -> None:
        """Queued jobs in order of creation, each on its executor when that executor has room: the GPUs it asks
        for free (given through their indices), or a CPU slot."""
        queued = session.scalars(select(Job).where(Job.status == JobStatus.QUEUED.value).order_by(Job.created_at)).all()
        if not queued:
            return
        active = session.scalars(select(Job).where(Job.status.in_(ACTIVE))).all()
        cpu_jobs = {name: sum(1 for j in active if j.executor == name and j.num_gpus == 0) for name in self.executors}
        busy = {name: {int(i) for j in active if j.executor == name and j.gpu_ids for i in j.gpu_ids.split(",")}
                for name in self.executors}
        for job in queued:
            if job.executor not in self.executors:
                self._refuse(session, job, f"the job asks for the {job.executor!r} executor, which this server has "
                                           f"not configured (it has: {', '.join(self.executors)})")
                continue
            offered = self.executor(job).resources()
            if job.num_gpus == 0:
                if cpu_jobs[job.executor] >= offered.cpu_slots:
                    continue
                gpu_ids: list[int] = []
            else:
                if job.num_gpus > offered.gpus:
                    self._refuse(session, job, f"the job needs {job.num_gpus} GPU(s); this host has {offered.gpus}")
                    continue
                free = [i for i in range(offered.gpus) if i not in busy[job.executor]]
                if len(free) < job.num_gpus:
                    continue
                gpu_ids = free[:job.num_gpus]
            if self._launch(session, job, gpu_ids):
                busy[job.executor].update(gpu_ids)
                if not gpu_ids:
                    cpu_jobs[job.executor] += 1

    def _refuse(self, session: Session, job: Job, reason: str) -> None:
        """A queued job that cannot run here fails (unless it was cancelled meanwhile: then that stands)."""
        lifecycle.mark_preparing(job)
        lifecycle.mark_failed(job, reason)
        try:
            session.commit()
        except StaleDataError:
            session.rollback()

    def _launch(self, session: Session, job: Job, gpu_ids: list[int]) -> bool:
        """Claim the queued job and start it; False when it was no longer queued (cancelled meanwhile, or claimed
        by another server on the same store): the row's version check refuses the stale claim."""
        lifecycle.mark_preparing(job)
        try:
            session.commit()
        except StaleDataError:
            session.rollback()
            return False
        executor = self.executor(job)
        try:
            handle = executor.start(job.id, gpu_ids)
        except OSError as err:
            lifecycle.commit_change(session, job, lambda j: lifecycle.mark_failed(j, f"could not start the engine: {err}"))
            return True
        gpus = ",".join(map(str, gpu_ids))

        def started(job: Job) -> None:
            if job.status == JobStatus.PREPARING.value:
                lifecycle.mark_running(job, handle, gpus)
            else:   # asked to stop while it started: its handle is kept, so the next tick stops it
                job.handle, job.gpu_ids = handle, gpus

        lifecycle.commit_change(session, job, started)
        log.info("job %s started (%s, gpus [%s])", job.id, executor.describe(handle), job.gpu_ids)
        return True
