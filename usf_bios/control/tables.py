"""The job store's tables (SQLAlchemy 2). SQLite and PostgreSQL use the same models."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def _now() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """A moment in UTC, read back with ``tzinfo=UTC`` on every backend (the API then sends ``+00:00``).

    SQLite keeps no offset and returns naive values; PostgreSQL's timestamptz comes back in the session's time
    zone. Values are stored as UTC; a naive value handed in is taken as UTC. The column is still
    ``DateTime(timezone=True)``, so the schema and its migrations do not change.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC with its offset; a naive value is taken as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))           # shown in lists; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ModelEntry(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner_key_id", "name", name="uq_models_owner_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))           # local | huggingface | modelscope
    repo_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    model_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    parameters: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    valid: Mapped[bool] = mapped_column(Boolean, default=True)
    problems: Mapped[list[str]] = mapped_column(JSON, default=list)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class DatasetEntry(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner_key_id", "name", name="uq_datasets_owner_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)     # the engine's job id
    name: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)        # written only by control.lifecycle
    stage: Mapped[str | None] = mapped_column(String(20), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)                 # the locked spec, as the engine reads it
    request: Mapped[dict[str, Any]] = mapped_column(JSON)              # the spec as the user sent it
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    num_gpus: Mapped[int] = mapped_column(Integer, default=1)
    executor: Mapped[str] = mapped_column(String(20), default="local", server_default="local")  # who runs it
    current_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    current_epoch: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the latest metric point
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    handle: Mapped[str | None] = mapped_column(String(255), nullable=True)   # the executor's handle of the job
    gpu_ids: Mapped[str | None] = mapped_column(String(64), nullable=True)
    events_offset: Mapped[int] = mapped_column(BigInteger, default=0)    # bytes of the events file already read
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # bumped by every UPDATE; a write from a session that read an older version fails (StaleDataError) instead of
    # overwriting what another writer committed meanwhile (lifecycle.commit_change, the scheduler)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")

    __mapper_args__ = {"version_id_col": version}

    @property
    def progress(self) -> float:
        return round(self.current_step / self.total_steps, 4) if self.total_steps else 0.0


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_metric_points_job_step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    grad_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)           # real (non-padding) tokens
    step_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_memory_gb: Mapped[float | None] = mapped_column(Float, nullable=True)
    validation_loss: Mapped[float | None] = mapped_column(Float, nullable=True)


class Artifact(Base):
    """A finished adapter: version N of its job name (per owner)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("owner_key_id", "name", "version", name="uq_artifacts_name_version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class WorkerSubmission(Base):
    """A job the GPU worker accepted through /training/submit (the worker's own store; a control plane leaves it
    empty). Its id is the external_job_id and, once the dataset is fetched, the id of its Job row."""

    __tablename__ = "worker_submissions"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(160), unique=True)          # the caller's id: submits are idempotent on it
    state: Mapped[str] = mapped_column(String(20))                         # fetching | accepted | failed | cancelled
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)                     # the JobSpec as submitted
    dataset_url: Mapped[str] = mapped_column(Text)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    artifact_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    callback_offset: Mapped[int] = mapped_column(BigInteger, default=0)   # events already delivered by callback
    callback_status: Mapped[str | None] = mapped_column(String(20), nullable=True)  # the last status delivered
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class CallbackReceipt(Base):
    """A worker callback's X-USF-Event-Id, kept so a replay changes nothing."""

    __tablename__ = "callback_receipts"
    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(160), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now, index=True)
