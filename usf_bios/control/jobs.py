"""Jobs: submit a spec with registered references, find, cancel, resume, and what a job has produced (metric
points, checkpoints, log, the finished adapter). No HTTP here: failures are domain errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from usf_bios.control import lifecycle
from usf_bios.control.datasets import find_dataset
from usf_bios.control.errors import Conflict, Forbidden, Invalid, NotFound
from usf_bios.control.keys import Caller
from usf_bios.control.lifecycle import InvalidTransition, JobStatus
from usf_bios.control.models import find_model
from usf_bios.control.schemas import (ArtifactRef, CheckpointPublic, EstimatePublic, JobPublic, JobsPublic,
                                      JobStatusPublic, MetricPointPublic, PlacementPublic)
from usf_bios.control.tables import Artifact, DatasetEntry, Job, MetricPoint, ModelEntry
from usf_bios.engine.checkpoint import list_checkpoints, read_state
from usf_bios.engine.jobdir import create_job
from usf_bios.control.executors.base import Executor, Resources
from usf_bios.engine.preflight import device_faults
from usf_bios.engine.reporters import ReporterError, check_reporters
from usf_bios.settings import Settings
from usf_bios.spec import DatasetRef, JobSpec
from usf_bios.models.inspect import folder_size
from usf_bios.storage import StorageLayout, confine

MAX_LIST = 500


def check_request(caller: Caller, spec: JobSpec, offered: Resources | None = None, *, local: bool = False) -> None:
    """What a submit and an estimate refuse before anything runs: ``trust_remote_code`` from a non-admin key
    (the model's own Python code would run in the engine with the server's rights), the device rules
    (``engine.preflight.device_faults``: what the engine refuses on any machine; with ``offered``, the executor's
    resources, also more GPUs than it has, and a quantized model without bitsandbytes where it runs here; the
    first, as Invalid naming its field), and a ``report_to`` tool not installed or not configured here."""
    if spec.trust_remote_code and not caller.is_admin:
        raise Forbidden("trust_remote_code: only an admin key may set trust_remote_code: true (it runs the model's "
                        "own Python code in the engine)")
    if problems := device_faults(spec, None if offered is None else offered.gpus, local=local):
        raise Invalid(*problems[0])
    try:
        check_reporters(spec)   # report_to: each tool's package installed and configured on this server
    except ReporterError as err:
        raise Invalid("report_to", str(err).removeprefix("report_to: ")) from None


def executor_resources(spec: JobSpec, settings: Settings, executors: Mapping[str, Executor]) -> tuple[Resources, bool]:
    """The resources of the executor the job would run on, and whether that is this host (local); Invalid when the
    server has no such executor (the scheduler would fail the job)."""
    name = executor_for(spec, settings)
    if name not in executors:
        raise Invalid("gpu_config.executor", f"this server has no {name!r} executor (it has: {', '.join(executors)})")
    return executors[name].resources(), name == "local"


def resolve_references(*, session: Session, caller: Caller, spec: JobSpec) -> tuple[ModelEntry, DatasetEntry]:
    """The spec's registered model and dataset, once ``check_request`` has passed (a submit and an estimate both
    start here)."""
    check_request(caller, spec)
    model = find_model(session, caller, spec.base_model)
    if model is None:
        raise Invalid("base_model", f"no registered model {spec.base_model!r} (register it with POST /api/models)")
    if not model.valid:
        raise Invalid("base_model", f"model {model.name!r} is not usable: {'; '.join(model.problems)}")
    return model, resolve_datasets(session=session, caller=caller, spec=spec)[0][0]


def resolve_datasets(*, session: Session, caller: Caller, spec: JobSpec) -> list[tuple[DatasetEntry, float]]:
    """Each registered dataset of the spec with its weight: the one ``dataset``, or every one of ``datasets``
    (Invalid names the missing one: ``datasets.1.name``)."""
    found = []
    for index, (ref, weight) in enumerate(spec.dataset_refs()):
        entry = find_dataset(session, caller, ref)
        if entry is None:
            field = "dataset" if spec.datasets is None else f"datasets.{index}.name"
            raise Invalid(field, f"no registered dataset {ref!r} (upload it with POST /api/datasets)")
        found.append((entry, weight))
    return found


def executor_for(spec: JobSpec, settings: Settings) -> str:
    """The executor a job runs on: the one its ``gpu_config.executor`` names, else the server's USF_EXECUTOR."""
    return settings.executor if spec.gpu_config.executor == "default" else spec.gpu_config.executor


def submit_job(*, session: Session, caller: Caller, layout: StorageLayout, settings: Settings, spec: JobSpec,
               executors: Mapping[str, Executor] | None = None) -> Job:
    """Lock the spec (with the model folder and dataset file it resolves to) and queue the job. With
    ``executors`` (the scheduler's), what they could not run is refused first, as the scheduler would."""
    executor = executor_for(spec, settings)
    if executor == "remote" and not (settings.gpu_cluster_api_url and settings.gpu_cluster_api_key):
        raise Invalid("gpu_config.executor", "this server has no remote worker (set GPU_CLUSTER_API_URL and "
                                             "GPU_CLUSTER_API_KEY)")
    if spec.gpu_config.num_nodes > 1 and executor != "ray":
        raise Invalid("gpu_config.num_nodes", f"{spec.gpu_config.num_nodes} nodes need the ray executor "
                                              f"(gpu_config.executor: ray); the {executor} executor runs a job on one host")
    if executors is not None:
        offered, local = executor_resources(spec, settings, executors)
        check_request(caller, spec, offered, local=local)
    model, dataset = resolve_references(session=session, caller=caller, spec=spec)
    if executor == "remote" and spec.datasets is not None:
        raise Invalid("datasets", "a remote job takes one dataset (the worker contract sends one dataset_url); "
                                  "give dataset, or run the mixture on the local executor")
    if spec.datasets is None:
        locked = spec.model_copy(update={"base_model": model.path, "dataset": dataset.path})
    else:
        mixture = [DatasetRef(name=entry.path, weight=weight)
                   for entry, weight in resolve_datasets(session=session, caller=caller, spec=spec)]
        locked = spec.model_copy(update={"base_model": model.path, "datasets": mixture})
    job_id = create_job(locked, layout)
    job = Job(id=job_id, name=spec.name, status=JobStatus.QUEUED.value, spec=locked.model_dump(mode="json"),
              request=spec.model_dump(mode="json"), model_id=model.id, dataset_id=dataset.id,
              num_gpus=spec.gpu_config.num_gpus, max_attempts=settings.max_attempts, owner_key_id=caller.owner,
              executor=executor, metrics={})
    session.add(job)
    session.commit()
    return job


def get_job(*, session: Session, caller: Caller, job_id: str) -> Job:
    """The caller's job; NotFound reads the same whether it is missing or another key's."""
    job = session.get(Job, job_id) if "\x00" not in job_id else None
    if job is None or not caller.can_see(job.owner_key_id):
        raise NotFound("job", job_id)
    return job


def job_public(session: Session, job: Job, artifact: Artifact | None = None) -> JobPublic:
    """The job as the API shows it; ``artifact`` when the caller has looked it up already."""
    if artifact is None and job.status == JobStatus.COMPLETED.value:
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id))
    return JobPublic.model_validate({
        **{name: getattr(job, name) for name in JobPublic.model_fields
           if name not in ("spec", "artifact", "metrics", "resumable")},
        "metrics": job.metrics or {}, "spec": job.request, "resumable": can_resume(job),
        "artifact": ArtifactRef.model_validate(artifact) if artifact else None,
    })


def find_jobs(*, session: Session, caller: Caller, statuses: Iterable[JobStatus] | None = None, limit: int = 50,
              offset: int = 0) -> JobsPublic:
    """The caller's jobs (with these statuses), newest first, and how many match."""
    query = caller.scope(select(Job), Job.owner_key_id)
    if statuses is not None:
        query = query.where(Job.status.in_([s.value for s in statuses]))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    done = [j.id for j in jobs if j.status == JobStatus.COMPLETED.value]
    artifacts = {a.job_id: a for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(done)))} if done else {}
    return JobsPublic(items=[job_public(session, j, artifacts.get(j.id)) for j in jobs], total=total, limit=limit,
                      offset=offset)


def job_placement(job: Job, executors: Mapping[str, Any]) -> PlacementPublic:
    """Where ``job`` runs, in words, with a remote job's last remote status."""
    executor = executors.get(job.executor)
    if executor is None:
        return PlacementPublic(executor=job.executor, where=f"{job.executor} (not configured on this server)")
    remote = executor.remote_status(job.id) if hasattr(executor, "remote_status") else None
    return PlacementPublic(executor=job.executor, where=executor.describe(job.handle or (job.id if remote else None)),
                           remote_status=remote.status if remote else None, remote_stage=remote.stage if remote else None,
                           remote_job_id=remote.external_job_id if remote else None)


def job_status(job: Job) -> JobStatusPublic:
    return JobStatusPublic.model_validate(job)


def _transition(session: Session, job: Job, action: str) -> None:
    def change(job: Job) -> None:
        if action == "cancel":
            # queued: cancelled at once; running: SIGTERM (checkpoint, then cancelled), SIGKILL after the grace period
            lifecycle.request_cancel(job)
        else:
            lifecycle.requeue(job, reset_attempts=True)   # the engine continues from the newest checkpoint
            job.error = None

    try:
        lifecycle.commit_change(session, job, change)
    except InvalidTransition as err:
        raise Conflict(str(err)) from None


def cancel_job(*, session: Session, job: Job) -> None:
    _transition(session, job, "cancel")


def resume_job(*, session: Session, job: Job) -> None:
    _transition(session, job, "resume")


def delete_job(*, session: Session, layout: StorageLayout, job: Job) -> None:
    """A final job's row, its metric points and artifact, and its files (output folder, checkpoints, log, events);
    Conflict while it is not final (cancel it first)."""
    if not JobStatus(job.status).is_terminal:
        raise Conflict(f"job {job.id} is {job.status}; cancel it first, then delete it")
    session.execute(delete(MetricPoint).where(MetricPoint.job_id == job.id))
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    session.delete(job)
    session.commit()
    for folder in (layout.job_output(job.id), layout.job_checkpoints(job.id)):
        shutil.rmtree(folder, ignore_errors=True)
    for path in (layout.job_log(job.id), layout.job_events(job.id), confine(layout.logs, f"{job.id}.out")):
        path.unlink(missing_ok=True)


def can_resume(job: Job) -> bool:
    """Whether resuming can help: a cancelled or interrupted job, or a failed one that got as far as training
    (a failure before it — a model, dataset or device the locked spec cannot use — would only repeat)."""
    if JobStatus.QUEUED not in lifecycle.ALLOWED[JobStatus(job.status)]:
        return False
    return job.status != JobStatus.FAILED.value or bool(job.total_steps)


def job_metrics(*, session: Session, job: Job) -> list[MetricPointPublic]:
    points = session.scalars(select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(MetricPoint.step))
    return [MetricPointPublic.model_validate(p) for p in points]


def job_checkpoints(*, layout: StorageLayout, job: Job) -> list[CheckpointPublic]:
    return [CheckpointPublic(step=read_state(folder).step, name=folder.name, size_bytes=folder_size(folder),
                             created_at=folder.stat().st_mtime)
            for folder in list_checkpoints(layout.job_checkpoints(job.id))]


def job_log_tail(*, layout: StorageLayout, job: Job, lines: int) -> str:
    path = layout.job_log(job.id)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) + "\n"


def adapter_folder(*, layout: StorageLayout, job: Job) -> Path:
    """The finished job's output folder; Conflict until the job has completed."""
    if job.status != JobStatus.COMPLETED.value:
        raise Conflict(f"job {job.id} is {job.status}; the adapter exists once it completes")
    return layout.job_output(job.id)


def download_replacements(*, layout: StorageLayout, job: Job) -> dict[str, bytes]:
    """The files the download sends with other contents: ``job.yaml`` with ``base_model`` and ``dataset`` relative
    to the storage root when they lie under it (``models/org--name``, ``data/datasets/ID/chat.jsonl``), so no
    absolute server path leaves the server that way; the file on disk keeps the paths the engine runs from."""
    path = layout.job_spec(job.id)
    if not path.is_file():
        return {}
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    root = layout.root.resolve()
    for field in ("base_model", "dataset"):
        value = spec.get(field) if isinstance(spec, dict) else None
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(root):
            spec[field] = Path(value).resolve().relative_to(root).as_posix()
    return {"job.yaml": yaml.safe_dump(spec, sort_keys=False).encode()}


def estimate(spec: JobSpec, model: ModelEntry, lengths: list[int] | memoryview, settings: Settings,
             sources: list[int] | None = None, weights: list[float] | None = None,
             executors: Mapping[str, Executor] | None = None) -> EstimatePublic:
    """The job's estimate from its dataset's token lengths (a weighted mixture's: with each example's dataset in
    ``sources`` and the datasets' ``weights``); Invalid where the model's config cannot be read or the engine would
    refuse the speed switches. With ``executors``, ``warning`` says what a submit would be refused for here (the
    estimate itself still answers: a spec may be planned for other hardware)."""
    import json

    from usf_bios.control.estimate import estimate_job
    from usf_bios.engine.plan import SpeedPlanError

    warning = None
    if executors is not None:
        try:
            offered, local = executor_resources(spec, settings, executors)
            faults = device_faults(spec, offered.gpus, local=local)
        except Invalid as refused:
            faults = [(refused.field, refused.reason)]
        if faults:
            warning = "a submit would be refused here: {}: {}".format(*faults[0])
    try:
        answer = estimate_job(spec, lengths, Path(model.path), model.parameters or 0, settings.gpu_prices, sources,
                              weights)
        return answer.model_copy(update={"warning": warning})
    except (OSError, json.JSONDecodeError) as exc:
        raise Invalid("base_model", f"model {model.name!r}: cannot read its config.json ({exc})") from None
    except SpeedPlanError as exc:
        field, _, reason = str(exc).partition(": ")
        raise Invalid(field, reason) from None
