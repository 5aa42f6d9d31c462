"""The GPU worker contract (ARCHITECTURE "GPU worker contract"; the BrightRun seed's field names, kept exactly).

Both sides use these models: the worker (usf_bios/worker/app.py) answers with them and the control plane's
remote executor (control/executors/remote.py) reads them. A submit carries a job spec in the seed's shape —
``hyperparameters`` holds ``base_model`` and every JobSpec hyperparameter, ``gpu_config`` the GPUs — and may carry
the rest of the JobSpec (``name``, ``dataset_format``, ``performance``, ``trust_remote_code``, ``report_to``) at top
level; ``submit_spec`` turns it into the one JobSpec type.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from usf_bios.engine.events import EVENT, Event
from usf_bios.spec import JobSpec, parse_spec
from usf_bios.status import JobStatus

RemoteStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
DATASET_PLACEHOLDER = "remote-dataset"   # the spec's dataset until the worker has fetched the file
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,159}$"


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., pattern=JOB_ID_PATTERN, description="The caller's id of the job; a submit is idempotent on it.")
    dataset_url: str = Field(..., min_length=8, max_length=8192, description="http(s) URL the worker fetches the dataset from (a signed URL).")
    hyperparameters: dict[str, Any] = Field(..., description="base_model and any JobSpec hyperparameter.")
    gpu_config: dict[str, Any] = Field(default_factory=dict, description="gpu_type, num_gpus.")
    callback_url: str | None = Field(None, max_length=8192, description="Where status, metric and completion callbacks go.")
    name: str | None = None
    base_model: str | None = None
    dataset_format: str | None = None
    performance: dict[str, Any] | None = None
    trust_remote_code: bool | None = None
    report_to: list[str] | None = Field(None, description="The JobSpec's report_to: tools the worker also sends the "
                                        "metrics to (each installed and configured on the worker).")


def default_name(job_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", job_id).lstrip("._-")[:100]
    return name or "job"


def submit_spec(request: SubmitRequest) -> JobSpec:
    """The submit as a JobSpec (its dataset a placeholder until fetched); SpecError naming the field at fault."""
    hyper = dict(request.hyperparameters)
    base_model = hyper.pop("base_model", None) or request.base_model
    gpu = {key: value for key, value in request.gpu_config.items() if key != "executor"}
    data: dict[str, Any] = {"name": request.name or default_name(request.job_id), "base_model": base_model,
                            "dataset": DATASET_PLACEHOLDER, "hyperparameters": hyper, "gpu_config": gpu}
    for field in ("dataset_format", "performance", "trust_remote_code", "report_to"):
        if getattr(request, field) is not None:
            data[field] = getattr(request, field)
    if base_model is None:
        data.pop("base_model")
    return parse_spec(data, source="submit")


def submit_payload(job_id: str, dataset_url: str, spec: JobSpec, callback_url: str | None) -> dict[str, Any]:
    """The submit body for ``spec`` (the control plane's side of ``submit_spec``)."""
    data = spec.model_dump(mode="json")
    return {"job_id": job_id, "dataset_url": dataset_url,
            "hyperparameters": {"base_model": data["base_model"], **data["hyperparameters"]},
            "gpu_config": {key: value for key, value in data["gpu_config"].items() if key != "executor"},
            "callback_url": callback_url, "name": data["name"], "dataset_format": data["dataset_format"],
            "performance": data["performance"], "trust_remote_code": data["trust_remote_code"],
            "report_to": data["report_to"]}


class SubmitAccepted(BaseModel):
    external_job_id: str


class RemoteMetrics(BaseModel):
    training_loss: float | None = None
    validation_loss: float | None = None
    learning_rate: float | None = None
    throughput: float | None = Field(None, description="Tokens per second of the latest step.")
    gpu_utilization: float | None = Field(None, description="Utilization in percent (NVML) of the job's GPUs, "
                                          "averaged, while it runs.")


class ArtifactInfo(BaseModel):
    size_bytes: int
    sha256: str


class RemoteJobStatus(BaseModel):
    external_job_id: str
    job_id: str
    status: RemoteStatus
    progress: float = 0.0
    current_epoch: float = 0.0
    current_step: int = 0
    total_steps: int | None = None
    stage: str | None = None
    metrics: RemoteMetrics = Field(default_factory=RemoteMetrics)
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifact: ArtifactInfo | None = Field(None, description="The tar of the output folder, once completed.")


class SequencedEvent(BaseModel):
    seq: int = Field(description="Where the event ends in the job's event stream; ask for ?after=seq to continue.")
    event: dict[str, Any]

    def typed(self) -> Event:
        return EVENT.validate_python(self.event)


class EventsPage(BaseModel):
    events: list[SequencedEvent]
    next: int = Field(description="The sequence number to continue from.")
    status: RemoteStatus


class CallbackBody(BaseModel):
    """What the worker POSTs to callback_url: the job's status, and the events since the previous callback."""

    kind: Literal["status", "metrics", "completed"]
    event_id: str
    status: RemoteJobStatus
    events: list[SequencedEvent] = Field(default_factory=list)
    after: int = Field(0, description="The sequence number the events continue from.")


def remote_status(status: JobStatus) -> RemoteStatus:
    """The lifecycle's status in the contract's five words (a job being prepared or cancelled still runs; one
    interrupted is queued to resume)."""
    if status in (JobStatus.QUEUED, JobStatus.INTERRUPTED):
        return "queued"
    if status in (JobStatus.PREPARING, JobStatus.RUNNING, JobStatus.CANCELLING):
        return "running"
    return status.value  # type: ignore[return-value]
