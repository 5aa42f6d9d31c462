"""Read a job's new events (from where the last read stopped) into the job row and its metric points."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from usf_bios.control.tables import Job, MetricPoint
from usf_bios.engine.events import parse_event
from usf_bios.storage import StorageLayout

METRIC_FIELDS = ("epoch", "loss", "learning_rate", "grad_norm", "tokens", "step_seconds", "tokens_per_second",
                 "gpu_memory_gb")


def read_new_events(layout: StorageLayout, job: Job) -> list[dict[str, Any]]:
    """Complete lines after ``job.events_offset``; the offset moves past them (a torn tail waits)."""
    path = layout.job_events(job.id)
    if not path.exists():
        return []
    with path.open("rb") as handle:
        handle.seek(job.events_offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return []
    job.events_offset += end + 1
    return [event for event in map(parse_event, chunk[:end].splitlines()) if event is not None]


def _point(session: Session, job_id: str, step: int) -> MetricPoint:
    point = session.scalar(select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step == step))
    if point is None:
        point = MetricPoint(job_id=job_id, step=step)
        session.add(point)
    return point


def apply_events(session: Session, job: Job, events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Update the job from its events; return the ``done`` event if one came."""
    done = None
    for event in events:
        kind = event["type"]
        if kind == "stage":
            job.stage = event.get("stage")
            if event.get("total_steps"):
                job.total_steps = int(event["total_steps"])
        elif kind == "metric":
            point = _point(session, job.id, int(event["step"]))
            for field in METRIC_FIELDS:  # a step redone after a resume replaces the lost one whole
                setattr(point, field, event.get(field))
            point.validation_loss = None
            job.current_step = int(event["step"])
            job.current_epoch = float(event.get("epoch") or 0.0)
            job.metrics = {"step": job.current_step, **{f: event.get(f) for f in METRIC_FIELDS}}
        elif kind == "eval":
            _point(session, job.id, int(event["step"])).validation_loss = event.get("validation_loss")
            job.metrics = {**(job.metrics or {}), "validation_loss": event.get("validation_loss")}
        elif kind == "done":
            done = event
        session.flush()
    return done
