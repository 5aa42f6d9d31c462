"""Jobs found in the storage layout that the job store does not know (run by `usf-bios train`, or kept from an
older database): each becomes a job row with the status its files show.

- its events end with ``done``: completed, failed or cancelled as that event says, with its metric points (and an
  artifact when completed): read-only history, resumable like any failed or cancelled job;
- an engine process holds its lock (``data/output/{job_id}/.lock``, found in ``/proc/locks``): running, with that
  process as its local executor's handle, so the scheduler follows it to its end like one it started;
- neither: interrupted (its process died); a resume continues from its newest checkpoint.

A folder whose ``job.yaml`` is younger than ``FRESH_S`` with no events and no process is left for a later pass: a
submit may be between writing it and committing its row. The server adopts at start and every ``INTERVAL_S`` after.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usf_bios.control import lifecycle
from usf_bios.control.artifacts import record_artifact
from usf_bios.control.executors.local import ProcessRef, process_start_time
from usf_bios.control.follow import apply_events
from usf_bios.control.tables import DatasetEntry, Job, ModelEntry
from usf_bios.datasets.locate import DatasetNotFound, locate_dataset
from usf_bios.engine.checkpoint import latest_checkpoint
from usf_bios.engine.events import DoneEvent, read_events
from usf_bios.models.sources import ModelNotFound, resolve_model
from usf_bios.settings import Settings
from usf_bios.spec import JobSpec, SpecError, load_spec
from usf_bios.status import JobStatus
from usf_bios.storage import PathOutsideRoot, StorageLayout

log = logging.getLogger("usf_bios.adopt")
FRESH_S = 120.0
INTERVAL_S = 10.0


@dataclass
class AdoptResult:
    adopted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (folder name, reason)


def lock_holder(lock: Path) -> int | None:
    """The pid holding an flock on ``lock`` (Linux's /proc/locks), or None."""
    try:
        st = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted and parts[4].isdigit():
            return int(parts[4])
    return None


def _candidates(layout: StorageLayout) -> list[Path]:
    if not layout.output.is_dir():
        return []
    return sorted(p for p in layout.output.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "job.yaml").is_file())


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _references(session: Session, spec: JobSpec, layout: StorageLayout,
                settings: Settings) -> tuple[str | None, str | None]:
    """The ids of the registered model and dataset the spec's references resolve to, where one is registered."""
    model_id = dataset_id = None
    try:
        folder = resolve_model(spec.base_model, layout, settings.supported_model_sources).path.resolve()
        model_id = session.scalar(select(ModelEntry.id).where(ModelEntry.path == str(folder)).limit(1))
    except (ModelNotFound, PathOutsideRoot, OSError):
        pass
    try:
        path = locate_dataset(spec.dataset_refs()[0][0], layout)
        dataset_id = session.scalar(select(DatasetEntry.id).where(DatasetEntry.path == str(path)).limit(1))
    except (DatasetNotFound, OSError):
        pass
    return model_id, dataset_id


def adopt_job(session: Session, layout: StorageLayout, settings: Settings, folder: Path) -> Job | str:
    """The job row for one job folder (added, not committed), or why it is left alone."""
    job_id = folder.name
    try:
        spec = load_spec(folder / "job.yaml")
    except SpecError as err:
        return f"its job.yaml does not validate: {err}"
    events, cursor = read_events(layout.job_events(job_id))
    done = next((e for e in reversed(events) if isinstance(e, DoneEvent)), None)
    holder = lock_holder(folder / ".lock")
    started = process_start_time(holder) if holder is not None else None
    written = (folder / "job.yaml").stat().st_mtime
    if started is None and not events and time.time() - written < FRESH_S:
        return "just created; looked at again later"
    model_id, dataset_id = _references(session, spec, layout, settings)
    job = Job(id=job_id, name=spec.name, spec=spec.model_dump(mode="json"), request=spec.model_dump(mode="json"),
              model_id=model_id, dataset_id=dataset_id, num_gpus=spec.gpu_config.num_gpus, executor="local",
              max_attempts=settings.max_attempts, owner_key_id=None, metrics={}, created_at=_utc(written),
              attempts=1 if events or started else 0, events_offset=cursor,
              started_at=_utc(events[0].ts) if events else None)
    if started is not None:          # a `usf-bios train` still running: followed from here on
        lifecycle.mark_adopted(job, JobStatus.RUNNING, handle=str(ProcessRef(holder, started)))  # type: ignore[arg-type]
    elif done is not None:
        lifecycle.mark_adopted(job, done.status, error=done.error, finished_at=_utc(done.ts))
    else:
        checkpoint = latest_checkpoint(layout.job_checkpoints(job_id))
        lifecycle.mark_adopted(job, JobStatus.INTERRUPTED, error=(
            "its process ended without a word (found by the server in the storage layout); a resume "
            + (f"continues from {checkpoint.name}" if checkpoint else "starts it from the beginning")))
    session.add(job)
    session.flush()
    apply_events(session, job, events)
    if job.status == JobStatus.COMPLETED.value:
        record_artifact(session, layout, job)
    return job


def adopt_jobs(*, session: Session, layout: StorageLayout, settings: Settings) -> AdoptResult:
    """Adopt every job folder the store does not know; each one committed on its own."""
    result = AdoptResult()
    folders = _candidates(layout)
    known: set[str] = set()
    names = [f.name for f in folders]
    for start in range(0, len(names), 500):
        known.update(session.scalars(select(Job.id).where(Job.id.in_(names[start:start + 500]))))
    for folder in folders:
        if folder.name in known:
            continue
        try:
            outcome = adopt_job(session, layout, settings, folder)
            if isinstance(outcome, str):
                session.rollback()
                result.skipped.append((folder.name, outcome))
                continue
            session.commit()
        except IntegrityError:   # a submit committed the same id in the meantime
            session.rollback()
            result.skipped.append((folder.name, "already in the job store"))
            continue
        except (OSError, ValueError) as err:
            session.rollback()
            result.skipped.append((folder.name, str(err)))
            log.warning("job folder %s not adopted: %s", folder, err)
            continue
        result.adopted.append(folder.name)
        log.info("adopted job %s (%s) from %s", folder.name, outcome.status, folder)
    return result
