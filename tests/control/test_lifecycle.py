"""The transition table and the only writers of Job.status."""

from __future__ import annotations

import pytest

from usf_bios.control import lifecycle
from usf_bios.control.lifecycle import ALLOWED, InvalidTransition, JobStatus
from usf_bios.control.tables import Job


def job(status: JobStatus) -> Job:
    return Job(id="j1", name="j", status=status.value, spec={}, request={}, attempts=0, max_attempts=3, metrics={})


def test_table_covers_every_status_and_terminal_ones_only_resume():
    assert set(ALLOWED) == set(JobStatus)
    assert ALLOWED[JobStatus.COMPLETED] == frozenset()
    for status in (JobStatus.FAILED, JobStatus.CANCELLED):
        assert status.is_terminal and ALLOWED[status] == {JobStatus.QUEUED}
    assert {s for s in JobStatus if s.is_active} == {JobStatus.PREPARING, JobStatus.RUNNING, JobStatus.CANCELLING}


def test_happy_path_sets_times_handle_and_attempts():
    j = job(JobStatus.QUEUED)
    lifecycle.mark_preparing(j)
    assert j.status == "preparing" and j.attempts == 1
    lifecycle.mark_running(j, "123:456", "0,1")
    assert (j.handle, j.gpu_ids) == ("123:456", "0,1") and j.started_at is not None
    lifecycle.mark_completed(j)
    assert j.status == "completed" and j.finished_at is not None and j.handle is None


def test_interrupted_job_is_requeued_and_counts_attempts():
    j = job(JobStatus.QUEUED)
    lifecycle.mark_preparing(j)
    lifecycle.mark_running(j, "1:1", "")
    lifecycle.mark_interrupted(j, "process lost")
    assert j.status == "interrupted" and j.error == "process lost" and j.handle is None
    lifecycle.requeue(j)
    assert j.status == "queued" and j.attempts == 1
    lifecycle.mark_preparing(j)
    assert j.attempts == 2 and j.error is None


def test_cancel_paths():
    queued = job(JobStatus.QUEUED)
    lifecycle.mark_cancelled(queued)
    assert queued.status == "cancelled"
    running = job(JobStatus.RUNNING)
    lifecycle.mark_cancelling(running)
    assert running.status == "cancelling" and running.cancel_requested_at is not None
    lifecycle.mark_cancelled(running)
    lifecycle.requeue(running, reset_attempts=True)
    assert running.status == "queued" and running.attempts == 0


@pytest.mark.parametrize("start, writer", [
    (JobStatus.COMPLETED, lambda j: lifecycle.mark_failed(j, "x")),
    (JobStatus.COMPLETED, lifecycle.requeue),
    (JobStatus.QUEUED, lifecycle.mark_completed),
    (JobStatus.QUEUED, lambda j: lifecycle.mark_running(j, "1:1", "")),
    (JobStatus.CANCELLED, lifecycle.mark_cancelling),
    (JobStatus.RUNNING, lifecycle.requeue),
])
def test_illegal_moves_are_refused_and_change_nothing(start, writer):
    j = job(start)
    with pytest.raises(InvalidTransition, match=f"is {start.value}"):
        writer(j)
    assert j.status == start.value


def test_nothing_else_writes_status():
    """Only control/lifecycle.py assigns Job.status (a grep over the package)."""
    import pathlib
    import re

    import usf_bios

    root = pathlib.Path(usf_bios.__file__).parent
    writers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if re.search(r"\.status\s*=(?!=)", p.read_text()) and p.name != "lifecycle.py"]
    assert writers == []


def test_every_metric_measure_has_a_column_and_an_api_field():
    from usf_bios.control.schemas import MetricPointPublic
    from usf_bios.control.tables import MetricPoint
    from usf_bios.engine.events import METRIC_FIELDS, MetricEvent

    assert set(METRIC_FIELDS) == set(MetricEvent.model_fields) - {"ts", "type", "step"}
    assert set(METRIC_FIELDS) <= set(MetricPoint.__table__.columns.keys())
    assert set(METRIC_FIELDS) <= set(MetricPointPublic.model_fields)


def test_an_adopted_row_gets_the_status_its_files_show_once():
    fresh = Job(id="j2", name="j", spec={}, request={}, attempts=0, max_attempts=3, metrics={})
    lifecycle.mark_adopted(fresh, JobStatus.RUNNING, handle="9:99")
    assert fresh.status == "running" and fresh.handle == "9:99"
    with pytest.raises(InvalidTransition):   # only a row that has no status yet
        lifecycle.mark_adopted(fresh, JobStatus.COMPLETED)
    with pytest.raises(ValueError, match="running, interrupted or final, not queued"):
        lifecycle.mark_adopted(Job(id="j3", name="j", spec={}, request={}), JobStatus.QUEUED)
