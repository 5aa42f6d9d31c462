"""The job status enum, shared by the engine (its ``done`` event) and the control plane (the lifecycle's
transition table in ``control/lifecycle.py``, the only writer of ``Job.status``)."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    CANCELLING = "cancelling"
    INTERRUPTED = "interrupted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:   # "failed", not "JobStatus.FAILED", in messages
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def is_active(self) -> bool:
        """A process may exist for the job."""
        return self in (JobStatus.PREPARING, JobStatus.RUNNING, JobStatus.CANCELLING)


TERMINAL = tuple(s for s in JobStatus if s.is_terminal)
