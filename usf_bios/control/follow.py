"""Apply a job's new events (typed, from the engine's events file or a remote worker) to its row and metric points."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from usf_bios.control.tables import Job, MetricPoint
from usf_bios.engine.events import METRIC_FIELDS, DoneEvent, EvalEvent, Event, MetricEvent, StageEvent


def _point(session: Session, job_id: str, step: int) -> MetricPoint:
    point = session.scalar(select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step == step))
    if point is None:
        point = MetricPoint(job_id=job_id, step=step)
        session.add(point)
    return point


def apply_events(session: Session, job: Job, events: Iterable[Event]) -> DoneEvent | None:
    """Update the job from its events; return the ``done`` event if one came."""
    done = None
    for event in events:
        if isinstance(event, StageEvent):
            job.stage = event.stage
            if event.total_steps:
                job.total_steps = event.total_steps
        elif isinstance(event, MetricEvent):
            point = _point(session, job.id, event.step)
            measures = {field: getattr(event, field) for field in METRIC_FIELDS}
            for field, value in measures.items():  # a step redone after a resume replaces the lost one whole
                setattr(point, field, value)
            point.validation_loss = None
            job.current_step = event.step
            job.current_epoch = event.epoch
            job.metrics = {"step": event.step, **measures}
        elif isinstance(event, EvalEvent):
            _point(session, job.id, event.step).validation_loss = event.validation_loss
            job.metrics = {**(job.metrics or {}), "validation_loss": event.validation_loss}
        elif isinstance(event, DoneEvent):
            done = event
        session.flush()
    return done
