"""The job store's schema and a JSON round trip on both backends: a real PostgreSQL and a SQLite file (WAL).

Each check runs once per backend (`db_url` is parametrized); the PostgreSQL server is the session's
(tests/api/postgres.py) and each test gets a fresh database on it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, select, text
from sqlalchemy.orm import Session

from tests.api.postgres import postgres_server  # noqa: F401
from usf_bios.control.db import MIGRATIONS, make_engine, migrate
from usf_bios.control.tables import Base, Job


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_server").new_database()
    return f"sqlite:///{tmp_path / 'data' / 'usf.db'}"


@pytest.fixture
def engine(db_url: str):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def assert_schema(engine) -> None:
    inspector = inspect(engine)
    tables = set(inspector.get_table_names())
    assert set(Base.metadata.tables) <= tables, f"missing: {set(Base.metadata.tables) - tables}"
    for name, table in Base.metadata.tables.items():
        columns = {column["name"] for column in inspector.get_columns(name)}
        assert columns == {column.name for column in table.columns}, name
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]


def test_migrate_creates_every_table(db_url: str, engine) -> None:
    migrate(db_url)
    assert_schema(engine)


def test_migrate_is_idempotent(db_url: str, engine) -> None:
    migrate(db_url)
    migrate(db_url)
    assert_schema(engine)


def test_job_spec_round_trips(db_url: str, engine) -> None:
    migrate(db_url)
    spec = {"model": "test--tiny-llama", "lora": {"r": 8, "alpha": 16.5, "targets": ["q_proj", "v_proj"]},
            "flags": {"packing": True, "resume": None}, "text": "naïve — ünïcode ✓", "nested": [[1, 2], {"a": []}]}
    request = {"name": "round-trip", "spec": {"lora": {"r": 8}}}
    with Session(engine) as session:
        session.add(Job(id="job-round-trip-1", name="round-trip", status="queued", spec=spec, request=request,
                        metrics={"loss": 1.25}))
        session.commit()
    engine.dispose()  # read it back through fresh connections
    fresh = make_engine(db_url)
    try:
        with Session(fresh) as session:
            job = session.scalars(select(Job).where(Job.id == "job-round-trip-1")).one()
            assert (job.spec, job.request, job.metrics) == (spec, request, {"loss": 1.25})
            assert (job.status, job.current_step, job.attempts, job.max_attempts) == ("queued", 0, 0, 3)
            assert job.created_at is not None
    finally:
        fresh.dispose()


def test_times_come_back_in_utc_with_their_offset(db_url: str, engine) -> None:
    """SQLite keeps no offset; PostgreSQL answers in the session's time zone (here +05:30): both read back UTC."""
    migrate(db_url)
    ist = timezone(timedelta(hours=5, minutes=30))
    with Session(engine) as session:
        session.add(Job(id="job-times", name="t", status="queued", spec={}, request={}, metrics={},
                        created_at=datetime(2026, 11, 23, 23, 30, tzinfo=ist), started_at=datetime(2026, 11, 23, 18, 5)))
        session.commit()
    fresh = make_engine(db_url)
    if db_url.startswith("postgresql"):
        @event.listens_for(fresh, "connect")
        def _india(dbapi_connection, _record) -> None:  # noqa: ANN001
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'Asia/Kolkata'")
            dbapi_connection.commit()
    try:
        with Session(fresh) as session:
            job = session.get(Job, "job-times")
            assert job.created_at == datetime(2026, 11, 23, 18, 0, tzinfo=timezone.utc)
            assert job.started_at == datetime(2026, 11, 23, 18, 5, tzinfo=timezone.utc)   # naive in: taken as UTC
            assert job.created_at.utcoffset() == job.started_at.utcoffset() == timedelta(0)
            assert job.created_at.isoformat() == "2026-11-23T18:00:00+00:00"
    finally:
        fresh.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal' / 'usf.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()
