"""The one interface between the scheduler and whatever runs a job: a process on this host today; a remote GPU
worker or a Ray cluster next. The scheduler knows only this; each executor knows only how to run the engine and
hand back its typed events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from usf_bios.engine.events import Event


@dataclass(frozen=True)
class Resources:
    """What an executor offers the scheduler: GPUs (by index) and CPU-only job slots."""

    gpus: int
    cpu_slots: int


@dataclass(frozen=True)
class Progress:
    """A job as its executor sees it now: the events after ``cursor`` and whether something still runs it."""

    events: list[Event] = field(default_factory=list)
    cursor: int = 0               # where the next poll continues (the local executor: a byte offset of the events file)
    alive: bool = False
    exit_code: int | None = None  # known when the executor saw the job's process end
    lost_reason: str | None = None  # why nothing runs the job any more, when the executor knows better than "ended"


@runtime_checkable
class Executor(Protocol):
    name: str

    def resources(self) -> Resources:
        """The GPUs and CPU slots jobs may be placed on."""

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        """Run the engine on the job; returns the handle by which this executor knows it (stored on the job row)."""

    def poll(self, handle: str | None, cursor: int, job_id: str) -> Progress:
        """New events after ``cursor`` and whether the job still runs (a job with no handle has nothing running)."""

    def cancel(self, handle: str, kill: bool) -> None:
        """Ask the job to stop (it saves a checkpoint first); ``kill``: stop it now."""

    def describe(self, handle: str | None) -> str:
        """Where the job runs, for the UI and the log (e.g. 'local process 4242')."""

    def forget(self, handle: str) -> None:
        """The job is final: drop what the executor kept about it."""
