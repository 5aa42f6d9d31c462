"""The OpenAI fine-tuning API's objects on the one job store: a file is a registered dataset, a fine-tuning job is a
job of ``control/jobs.py`` (the request becomes a ``JobSpec``; the same lifecycle, scheduler and engine run it), its
events are the engine's events and its checkpoints the engine's checkpoints. No HTTP here: the routes are in
``api/routes/openai_finetune.py``; what they answer is the JSON these functions build (docs/inference.md).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from usf_bios.control import jobs as job_domain
from usf_bios.control.datasets import ReceivedUpload, register_dataset
from usf_bios.control.errors import Invalid, NotFound
from usf_bios.control.keys import Caller, name_taken
from usf_bios.control.serving import CHECKPOINT_PREFIX, base_name_of, fine_tuned_name
from usf_bios.control.tables import DatasetEntry, Job, MetricPoint
from usf_bios.engine.checkpoint import list_checkpoints, read_state
from usf_bios.engine.events import CheckpointEvent, DoneEvent, EvalEvent, MetricEvent, StageEvent, iter_events
from usf_bios.settings import Settings
from usf_bios.spec import JobSpec, SpecError, parse_spec
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout

BASE_LEARNING_RATE = 2.0e-4     # learning_rate_multiplier 1 (the LoRA default of spec.py)
MAX_MICRO_BATCH = 8             # an OpenAI batch_size above it is reached with gradient accumulation
STATUS = {JobStatus.QUEUED: "queued", JobStatus.PREPARING: "running", JobStatus.RUNNING: "running",
          JobStatus.CANCELLING: "cancelled", JobStatus.INTERRUPTED: "queued", JobStatus.COMPLETED: "succeeded",
          JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}


def ts(moment: Any) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


# --- files ----------------------------------------------------------------------------------------------------

def file_object(entry: DatasetEntry) -> dict[str, Any]:
    return {"id": entry.id, "object": "file", "bytes": entry.size_bytes, "created_at": ts(entry.created_at),
            "filename": entry.filename, "purpose": "fine-tune", "status": "processed", "status_details": None,
            "expires_at": None}


def upload_file(*, session: Session, caller: Caller, layout: StorageLayout, upload: ReceivedUpload) -> DatasetEntry:
    """A ``purpose=fine-tune`` file, validated with the dataset parser and registered as a dataset (named after the
    file, with a short suffix when the caller has a dataset of that name already)."""
    purpose = (upload.fields.get("purpose") or "").strip()
    if purpose != "fine-tune":
        upload.path.unlink(missing_ok=True)
        raise Invalid("purpose", f"{purpose or '(missing)'!r}: this server takes only purpose 'fine-tune'")
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(upload.filename).stem)[:180].strip(".") or "file"
    name = stem if not name_taken(session, DatasetEntry, caller.owner, stem) else f"{stem}-{secrets.token_hex(3)}"
    upload.fields = {"name": name, "format": "auto"}
    return register_dataset(session=session, caller=caller, layout=layout, upload=upload)


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one whose id is ``after`` (all when None or unknown), ``limit``."""
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    chosen = items[start:start + limit]
    return {"object": "list", "data": chosen, "has_more": start + limit < len(items),
            "first_id": chosen[0]["id"] if chosen else None, "last_id": chosen[-1]["id"] if chosen else None}


# --- jobs -----------------------------------------------------------------------------------------------------

Auto = Literal["auto"]


class FineTuneHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=4096)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=5000)] = "auto"


class FineTuneMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised"] = "supervised"
    supervised: dict[str, Any] | None = None


class FineTuneCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``, as the openai client sends it; ``usf`` (pass it with ``extra_body``) is a partial
    job spec (``hyperparameters``, ``gpu_config``, ``performance``, ``dataset_format``) whose fields win."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=300)
    training_file: str = Field(..., min_length=1, max_length=100)
    validation_file: str | None = None
    hyperparameters: FineTuneHyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    usf: dict[str, Any] | None = None


def auto_epochs(rows: int) -> int:
    """OpenAI's rule: 3 epochs, more for small files (at least ~100 examples seen, at most 25 epochs), fewer for
    huge ones (at most ~25,000 examples seen)."""
    if rows * 3 < 100:
        return min(25, math.ceil(100 / max(rows, 1)))
    if rows * 3 > 25_000:
        return max(1, 25_000 // rows)
    return 3


def auto_batch_size(rows: int) -> int:
    """About 0.2% of the examples per step, as a power of two from 1 to 32."""
    return min(32, 2 ** max(0, math.floor(math.log2(max(1.0, rows * 0.002)))))


def _micro_batches(batch_size: int) -> tuple[int, int]:
    """(rows per micro-batch, accumulation) whose product is ``batch_size``, the micro-batch as large as allowed."""
    micro = max(d for d in range(1, min(batch_size, MAX_MICRO_BATCH) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def _job_name(body: FineTuneCreate, model_name: str) -> str:
    raw = body.suffix or f"ft-{model_name}"
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).strip("-._")[:60]
    return name or "ft"


def build_spec(body: FineTuneCreate, *, model_name: str, dataset: DatasetEntry, gpus: int) -> JobSpec:
    """The JobSpec of an OpenAI request: n_epochs, batch_size (examples per optimizer step) and the learning rate
    (``BASE_LEARNING_RATE`` × multiplier), "auto" chosen from the file's rows; on a GPU if the host has one."""
    if body.validation_file:
        raise Invalid("validation_file", "a separate validation file is not supported yet; a share of training_file "
                                         "is held out instead (set usf.hyperparameters.val_split)")
    hp = body.hyperparameters or FineTuneHyperparameters()
    if body.method and body.method.supervised and body.hyperparameters is None:
        hp = FineTuneHyperparameters.model_validate((body.method.supervised or {}).get("hyperparameters") or {})
    epochs = auto_epochs(dataset.rows) if hp.n_epochs == "auto" else hp.n_epochs
    batch = auto_batch_size(dataset.rows) if hp.batch_size == "auto" else hp.batch_size
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    micro, accumulation = _micro_batches(batch)
    hyper: dict[str, Any] = {"num_epochs": epochs, "batch_size": micro, "gradient_accumulation_steps": accumulation,
                             "learning_rate": min(1.0, BASE_LEARNING_RATE * multiplier)}
    if body.seed is not None:
        hyper["seed"] = body.seed
    if not gpus:
        hyper["precision"] = "fp32"
    spec: dict[str, Any] = {"name": _job_name(body, model_name), "base_model": body.model, "dataset": dataset.id,
                            "hyperparameters": hyper, "gpu_config": {"num_gpus": 1 if gpus else 0}}
    extra = body.usf or {}
    unknown = set(extra) - {"hyperparameters", "gpu_config", "performance", "dataset_format"}
    if unknown:
        raise Invalid(f"usf.{sorted(unknown)[0]}", "unknown field (usf takes hyperparameters, gpu_config, performance, "
                                                   "dataset_format)")
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    try:
        return parse_spec(spec)
    except SpecError as err:
        field, _, reason = err.problems[0].partition(": ")
        raise Invalid(field if field != "spec" else "usf", reason) from None


def create_fine_tune(*, session: Session, caller: Caller, layout: StorageLayout, settings: Settings,
                     body: FineTuneCreate, gpus: int) -> Job:
    dataset = session.get(DatasetEntry, body.training_file) if "\x00" not in body.training_file else None
    if dataset is None or not caller.can_see(dataset.owner_key_id):
        raise Invalid("training_file", f"no file {body.training_file!r} (upload it with POST /v1/files)")
    from usf_bios.control.models import find_model

    model = find_model(session, caller, body.model)
    if model is None:
        raise Invalid("model", f"no registered model {body.model!r} (GET /v1/models lists them)")
    spec = build_spec(body, model_name=model.name, dataset=dataset, gpus=gpus)
    return job_domain.submit_job(session=session, caller=caller, layout=layout, settings=settings, spec=spec)


def _trained_tokens(session: Session, job: Job) -> int | None:
    if job.status != JobStatus.COMPLETED.value:
        return None
    total = session.scalar(select(func.sum(MetricPoint.tokens)).where(MetricPoint.job_id == job.id))
    return int(total) if total is not None else None


def job_object(session: Session, job: Job) -> dict[str, Any]:
    """A job of the store as OpenAI's ``fine_tuning.job``."""
    spec = job.spec or {}
    hyper = spec.get("hyperparameters") or {}
    status = STATUS[JobStatus(job.status)]
    base = base_name_of(session, job)
    shown = {"n_epochs": hyper.get("num_epochs"),
             "batch_size": (hyper.get("batch_size") or 1) * (hyper.get("gradient_accumulation_steps") or 1),
             "learning_rate_multiplier": round((hyper.get("learning_rate") or BASE_LEARNING_RATE) / BASE_LEARNING_RATE, 6)}
    error = ({"code": "training_failed", "message": job.error or "the job failed", "param": None}
             if status == "failed" else None)
    return {"id": job.id, "object": "fine_tuning.job", "created_at": ts(job.created_at),
            "finished_at": ts(job.finished_at) if JobStatus(job.status).is_terminal else None,
            "model": base or (job.request or {}).get("base_model"), "organization_id": "usf-bios",
            "status": status, "fine_tuned_model": fine_tuned_name(job, base) if status == "succeeded" else None,
            "training_file": job.dataset_id, "validation_file": None, "result_files": [],
            "hyperparameters": shown, "seed": hyper.get("seed", 42), "trained_tokens": _trained_tokens(session, job),
            "error": error, "estimated_finish": None, "integrations": [], "metadata": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": shown}}, "suffix": job.name}


def list_fine_tunes(*, session: Session, caller: Caller, after: str | None, limit: int) -> dict[str, Any]:
    """The caller's jobs, newest first, as OpenAI pages them (``after`` a job id: the ones created before it)."""
    query = caller.scope(select(Job), Job.owner_key_id)
    if after:
        anchor = job_domain.get_job(session=session, caller=caller, job_id=after)
        query = query.where((Job.created_at < anchor.created_at) |
                            ((Job.created_at == anchor.created_at) & (Job.id < anchor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return {"object": "list", "data": [job_object(session, j) for j in rows[:limit]], "has_more": len(rows) > limit}


def _event(event_id: str, created: float, message: str, *, level: str = "info", kind: str = "message",
           data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": event_id, "object": "fine_tuning.job.event", "created_at": int(created), "level": level,
            "message": message, "data": data or {}, "type": kind}


def job_events(*, session: Session, layout: StorageLayout, job: Job, after: str | None, limit: int) -> dict[str, Any]:
    """The engine's events as OpenAI's job events, newest first (``after`` an event id: the ones before it)."""
    events = [_event(f"ftevent-{job.id}-0", job.created_at.timestamp(), f"Created fine-tuning job {job.id}")]
    total = None
    for offset, event in iter_events(layout.job_events(job.id)):
        eid = f"ftevent-{job.id}-{offset}"
        if isinstance(event, StageEvent):
            total = event.total_steps or total
            text = f"Training started: {event.total_steps} steps" if event.stage == "training" else f"Stage: {event.stage}"
            events.append(_event(eid, event.ts, text))
        elif isinstance(event, MetricEvent):
            events.append(_event(eid, event.ts, f"Step {event.step}/{total or '?'}: training loss={event.loss:.4f}",
                                 kind="metrics", data={"step": event.step, "train_loss": event.loss,
                                                       "total_steps": total, "learning_rate": event.learning_rate,
                                                       "epoch": event.epoch}))
        elif isinstance(event, EvalEvent):
            events.append(_event(eid, event.ts, f"Step {event.step}: validation loss={event.validation_loss:.4f}",
                                 kind="metrics", data={"step": event.step, "valid_loss": event.validation_loss}))
        elif isinstance(event, CheckpointEvent):
            events.append(_event(eid, event.ts, f"Checkpoint created at step {event.step}"))
        elif isinstance(event, DoneEvent):
            if event.status == JobStatus.COMPLETED:
                name = fine_tuned_name(job, base_name_of(session, job))
                events.append(_event(eid, event.ts, f"New fine-tuned model created: {name}"))
                events.append(_event(eid + "-done", event.ts, "The job has successfully completed"))
            elif event.status == JobStatus.FAILED:
                events.append(_event(eid, event.ts, f"The job failed: {event.error}", level="error"))
            else:
                events.append(_event(eid, event.ts, "The job was cancelled"))
    return page(events[::-1], after, limit)


def job_checkpoints(*, session: Session, layout: StorageLayout, job: Job, after: str | None,
                    limit: int) -> dict[str, Any]:
    """The job's checkpoints as OpenAI's, newest first; each is servable by its ``fine_tuned_model_checkpoint``."""
    name = fine_tuned_name(job, base_name_of(session, job))
    losses = {p.step: p for p in session.scalars(select(MetricPoint).where(MetricPoint.job_id == job.id))}
    items = []
    for folder in reversed(list_checkpoints(layout.job_checkpoints(job.id))):
        step = read_state(folder).step
        point = losses.get(step)
        items.append({"id": f"ftckpt-{job.id}-{step}", "object": "fine_tuning.job.checkpoint",
                      "created_at": int(folder.stat().st_mtime), "fine_tuning_job_id": job.id, "step_number": step,
                      "fine_tuned_model_checkpoint": f"{name}:{CHECKPOINT_PREFIX}{step}",
                      "metrics": {"step": step, "train_loss": point.loss if point else None,
                                  "valid_loss": point.validation_loss if point else None}})
    return page(items, after, limit)


def get_file(*, session: Session, caller: Caller, file_id: str) -> DatasetEntry:
    entry = session.get(DatasetEntry, file_id) if "\x00" not in file_id else None
    if entry is None or not caller.can_see(entry.owner_key_id):
        raise NotFound("file", file_id)
    return entry
