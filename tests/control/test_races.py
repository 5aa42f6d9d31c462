"""A cancel that lands while the scheduler starts the job is never lost (found in CI: the API cancelled a queued job,
the scheduler — which had read it as queued — then claimed it, and the job ran on as "running"). Each job row has a
version; a write from a session that read an older one fails instead of overwriting. Real SQLite store, real
scheduler, real engine process on the tiny model."""

from __future__ import annotations

import time

from tests.conftest import chat_rows, write_jsonl
from tests.engine.test_run import make_spec
from usf_bios.control import jobs, lifecycle
from usf_bios.control.db import Database, migrate
from usf_bios.control.executors.local import LocalExecutor, ProcessRef, process_start_time
from usf_bios.control.scheduler import Scheduler
from usf_bios.control.tables import Job
from usf_bios.engine.jobdir import create_job
from usf_bios.settings import get_settings
from usf_bios.spec import parse_spec
from usf_bios.status import JobStatus


def store() -> Database:
    settings = get_settings()
    migrate(settings.database_url)
    return Database(settings.database_url)


def queued_row(db: Database, job_id: str) -> None:
    with db.session() as session:
        session.add(Job(id=job_id, name="race", status=JobStatus.QUEUED.value, spec={}, request={}, num_gpus=0,
                        executor="local"))
        session.commit()


def status_of(db: Database, job_id: str) -> Job:
    with db.session() as session:
        return session.get(Job, job_id)


class StartCounting(LocalExecutor):
    """The real local executor; counts its starts and, when given, runs ``during_start`` as the engine starts."""

    def __init__(self, layout, settings, during_start=None):
        super().__init__(layout, settings)
        self.starts, self.during_start = 0, during_start

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        self.starts += 1
        handle = super().start(job_id, gpu_ids)
        if self.during_start:
            self.during_start(job_id)
        return handle


def test_a_cancel_between_the_schedulers_read_and_its_claim_wins(layout):
    db = store()
    queued_row(db, "race-1")
    executor = StartCounting(layout, get_settings())
    scheduler = Scheduler(db, layout, get_settings(), executors={"local": executor})
    with db.session() as stale:
        [job] = stale.query(Job).filter(Job.status == JobStatus.QUEUED.value).all()     # the scheduler's read
        with db.session() as api:                                                      # the API's cancel
            jobs.cancel_job(session=api, job=api.get(Job, "race-1"))
        assert scheduler._launch(stale, job, []) is False
    assert executor.starts == 0
    row = status_of(db, "race-1")
    assert row.status == JobStatus.CANCELLED.value and row.attempts == 0 and row.handle is None


def test_a_cancel_while_the_engine_starts_stops_it(layout, tiny_model, tmp_path):
    db = store()
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    job_id = create_job(parse_spec(make_spec(tiny_model, dataset, num_epochs=1000, save_steps=1000)), layout)
    queued_row(db, job_id)

    def cancel_now(jid: str) -> None:
        with db.session() as api:
            jobs.cancel_job(session=api, job=api.get(Job, jid))      # preparing → cancelling

    executor = StartCounting(layout, get_settings(), during_start=cancel_now)
    scheduler = Scheduler(db, layout, get_settings(), executors={"local": executor})
    scheduler.tick()
    row = status_of(db, job_id)
    assert executor.starts == 1
    assert row.status == JobStatus.CANCELLING.value and row.handle, "the start overwrote the cancel"
    ref = ProcessRef.parse(row.handle)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and status_of(db, job_id).status != JobStatus.CANCELLED.value:
        scheduler.tick()
        time.sleep(0.3)
    assert status_of(db, job_id).status == JobStatus.CANCELLED.value
    assert process_start_time(ref.pid) is None      # the engine is gone, not left running


def test_commit_change_applies_the_change_again_to_what_another_writer_committed(layout):
    db = store()
    queued_row(db, "race-2")
    with db.session() as api:
        job = api.get(Job, "race-2")                      # read at version 1
        with db.session() as scheduler:                   # the scheduler claims it meanwhile
            claimed = scheduler.get(Job, "race-2")
            lifecycle.mark_preparing(claimed)
            scheduler.commit()
        lifecycle.commit_change(api, job, lifecycle.request_cancel)   # queued → cancelled would be wrong now
    row = status_of(db, "race-2")
    assert row.status == JobStatus.CANCELLING.value and row.attempts == 1 and row.version == 3
