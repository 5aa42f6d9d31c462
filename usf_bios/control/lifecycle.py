"""Job status: the one transition table, and the only functions that write ``Job.status`` (the enum itself is
``usf_bios.status.JobStatus``, re-exported here)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from usf_bios.status import JobStatus

if TYPE_CHECKING:
    from usf_bios.control.tables import Job


S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.QUEUED: frozenset({S.PREPARING, S.CANCELLED}),
    S.PREPARING: frozenset({S.RUNNING, S.FAILED, S.CANCELLING, S.INTERRUPTED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.INTERRUPTED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.COMPLETED, S.FAILED}),
    S.INTERRUPTED: frozenset({S.QUEUED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),      # resume
    S.CANCELLED: frozenset({S.QUEUED}),   # resume
}


class InvalidTransition(ValueError):
    def __init__(self, job_id: str, current: JobStatus, target: JobStatus):
        allowed = ", ".join(sorted(s.value for s in ALLOWED[current])) or "nothing (it is final)"
        super().__init__(f"job {job_id} is {current.value}; it cannot become {target.value} (from {current.value}: {allowed})")
        self.current, self.target = current, target


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _move(job: "Job", target: JobStatus) -> None:
    current = JobStatus(job.status)
    if target not in ALLOWED[current]:
        raise InvalidTransition(job.id, current, target)
    job.status = target.value


def mark_preparing(job: "Job") -> None:
    _move(job, S.PREPARING)
    job.attempts += 1
    job.error = None


def mark_running(job: "Job", handle: str, gpu_ids: str) -> None:
    """Started by its executor, which knows it by ``handle`` (the local executor: '<pid>:<start time>')."""
    _move(job, S.RUNNING)
    job.handle, job.gpu_ids = handle, gpu_ids
    job.started_at = job.started_at or _now()


def mark_cancelling(job: "Job") -> None:
    _move(job, S.CANCELLING)
    job.cancel_requested_at = _now()


def request_cancel(job: "Job") -> None:
    """A user's cancel: a queued job is cancelled at once; a started one is asked to stop (SIGTERM, a checkpoint,
    then cancelled); one already stopping stays so."""
    if job.status == S.QUEUED.value:
        mark_cancelled(job)
    elif job.status != S.CANCELLING.value:
        mark_cancelling(job)


def commit_change(session: Any, job: "Job", change: Callable[["Job"], None], tries: int = 5) -> None:
    """Apply ``change`` to the job and commit. A job row carries a version (tables.Job): when another writer — the
    scheduler's thread, another server on the same store — committed the row since this session read it, the
    commit fails instead of overwriting that write (a cancel lost to a start, a start over a cancel); the
    change is then applied again to what was committed. An InvalidTransition propagates (rolled back)."""
    from sqlalchemy.orm.exc import StaleDataError

    for attempt in range(tries):
        try:
            change(job)
            session.commit()
            return
        except StaleDataError:
            session.rollback()      # the job's attributes are reloaded on their next read
            if attempt == tries - 1:
                raise
        except InvalidTransition:
            session.rollback()
            raise


def _finish(job: "Job", target: JobStatus, error: str | None = None) -> None:
    _move(job, target)
    job.error = error
    job.finished_at = _now()
    job.handle = None


def mark_completed(job: "Job") -> None:
    _finish(job, S.COMPLETED)


def mark_failed(job: "Job", reason: str) -> None:
    _finish(job, S.FAILED, reason)


def mark_cancelled(job: "Job") -> None:
    _finish(job, S.CANCELLED)


def mark_interrupted(job: "Job", reason: str) -> None:
    _move(job, S.INTERRUPTED)
    job.error = reason
    job.handle = None


def requeue(job: "Job", reset_attempts: bool = False) -> None:
    """Back to the queue: after an interruption, or a resume asked for by a user (which resets attempts)."""
    _move(job, S.QUEUED)
    if reset_attempts:
        job.attempts = 0
    job.finished_at = None
    job.cancel_requested_at = None


def mark_adopted(job: "Job", status: JobStatus, *, handle: str | None = None, error: str | None = None,
                 finished_at: datetime | None = None) -> None:
    """A row new to the store for a job found in the storage layout (control/adopt.py): the status its files show —
    running (followed through ``handle``), interrupted, or the terminal status of its ``done`` event."""
    if getattr(job, "status", None) is not None:
        raise InvalidTransition(job.id, JobStatus(job.status), status)
    if status not in (S.RUNNING, S.INTERRUPTED) and not status.is_terminal:
        raise ValueError(f"an adopted job is running, interrupted or final, not {status.value}")
    job.status = status.value
    job.handle, job.error, job.finished_at = handle, error, finished_at
