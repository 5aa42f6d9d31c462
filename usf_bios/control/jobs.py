"""Jobs as the REST API sees them: create from a spec with registered references, cancel, resume."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from usf_bios.api.deps import Caller
from usf_bios.control import lifecycle
from usf_bios.control.lifecycle import JobStatus
from usf_bios.control.tables import DatasetEntry, Job, ModelEntry
from usf_bios.engine.jobdir import create_job
from usf_bios.settings import Settings
from usf_bios.spec import JobSpec
from usf_bios.storage import StorageLayout


class JobRequestError(ValueError):
    """A request that names something that is not there; ``field`` is the spec path at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def errors(self) -> list[dict[str, str]]:
        """The API's error list, as the request validation handler sends it."""
        return [{"field": self.field, "message": self.message}]


def resolve_references(session: Session, caller: Caller, spec: JobSpec) -> tuple[ModelEntry, DatasetEntry]:
    from usf_bios.api.routes.datasets import find_dataset
    from usf_bios.api.routes.models import find_model

    model = find_model(session, caller, spec.base_model)
    if model is None:
        raise JobRequestError("base_model", f"no registered model {spec.base_model!r} (register it with POST /api/models)")
    if not model.valid:
        raise JobRequestError("base_model", f"model {model.name!r} is not usable: {'; '.join(model.problems)}")
    dataset = find_dataset(session, caller, spec.dataset)
    if dataset is None:
        raise JobRequestError("dataset", f"no registered dataset {spec.dataset!r} (upload it with POST /api/datasets)")
    return model, dataset


def submit_job(session: Session, caller: Caller, layout: StorageLayout, settings: Settings, spec: JobSpec) -> Job:
    """Lock the spec (with the model folder and dataset file it resolves to) and queue the job."""
    model, dataset = resolve_references(session, caller, spec)
    locked = spec.model_copy(update={"base_model": model.path, "dataset": dataset.path})
    job_id = create_job(locked, layout)
    job = Job(id=job_id, name=spec.name, status=JobStatus.QUEUED.value, spec=locked.model_dump(mode="json"),
              request=spec.model_dump(mode="json"), model_id=model.id, dataset_id=dataset.id,
              num_gpus=spec.gpu_config.num_gpus, max_attempts=settings.max_attempts, owner_key_id=caller.owner,
              metrics={})
    session.add(job)
    session.commit()
    return job


def cancel_job(session: Session, job: Job) -> None:
    """Queued: cancelled at once. Running: SIGTERM (checkpoint, then cancelled), SIGKILL after the grace period."""
    if job.status == JobStatus.QUEUED.value:
        lifecycle.mark_cancelled(job)
    else:
        lifecycle.mark_cancelling(job)
    session.commit()


def resume_job(session: Session, job: Job) -> None:
    """Back to the queue; the engine continues from the newest checkpoint."""
    lifecycle.requeue(job, reset_attempts=True)
    job.error = None
    session.commit()


def job_public(job: Job, artifact: Any | None = None) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "status": job.status, "stage": job.stage, "progress": job.progress,
        "current_step": job.current_step, "total_steps": job.total_steps, "current_epoch": job.current_epoch,
        "metrics": job.metrics or {}, "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "attempts": job.attempts, "max_attempts": job.max_attempts,
        "model_id": job.model_id, "dataset_id": job.dataset_id, "num_gpus": job.num_gpus, "spec": job.request,
        "artifact": {"name": artifact.name, "version": artifact.version} if artifact else None,
    }
