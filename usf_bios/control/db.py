"""Database engine and sessions; migrations are applied when the server starts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# Connections: more than the threads that can ask at once (AnyIO's 40 request threads, the scheduler, the token-length
# workers), so a request never waits for one; past that a request waits POOL_TIMEOUT_S and is answered 503.
POOL = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 10}


def make_engine(url: str) -> Engine:
    """SQLite in WAL mode with foreign keys and a busy timeout; any other URL as given."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **POOL)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, **POOL)


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (Alembic)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


class Database:
    """The engine and a session factory for one DATABASE_URL. ``generation`` changes after every commit of one of
    its sessions that wrote something (a flush, or an UPDATE/DELETE statement): answers cached by the API
    (api/reads.py) are valid only for the generation they were read in. It counts this process's writes only."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._changes = itertools.count(1)
        self.generation = 0
        event.listen(self.sessions, "after_flush", _mark_written)
        event.listen(self.sessions, "do_orm_execute", _mark_if_write)
        event.listen(self.sessions, "after_rollback", _clear_written)
        event.listen(self.sessions, "after_commit", self._after_commit)

    def _after_commit(self, session: Session) -> None:
        if session.info.pop("written", False):   # after the commit, so a read that sees the old generation
            self.generation = next(self._changes)   # was either before the commit or is thrown away

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session


def _mark_written(session: Session, _flush_context: object) -> None:
    session.info["written"] = True


def _mark_if_write(state: ORMExecuteState) -> None:
    if not state.is_select:
        state.session.info["written"] = True


def _clear_written(session: Session) -> None:
    session.info.pop("written", None)
