"""What the control plane hands out about each entity: one pydantic model per answer, built from the job store's
rows by the domain modules, declared as the API's ``response_model`` (so /docs documents every response), and
rendered by the dashboard's fragments."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from usf_bios.engine.events import METRIC_FIELDS
from usf_bios.status import JobStatus


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- system ---------------------------------------------------------------------------------------------------

class Health(_Out):
    status: Literal["ok"] = "ok"
    version: str


class GpuPublic(_Out):
    index: int
    name: str
    memory_total_gb: float
    memory_used_gb: float
    utilization_percent: int


class DiskPublic(_Out):
    path: str
    total_gb: float
    free_gb: float


class WorkerPublic(_Out):
    """A place remote jobs run: the worker or RunPod endpoint at GPU_CLUSTER_API_URL, and whether it answers."""

    executor: str
    kind: str = Field(description="worker (the /training/* contract) or runpod")
    url: str
    reachable: bool
    detail: str = Field(description="What it said (its GPUs, its version), or why it could not be reached.")


class RayNodePublic(_Out):
    """One alive node of the Ray cluster, with its CPUs and GPUs: all of them, and those no task holds now."""

    node_id: str
    ip: str
    head: bool
    cpus: float
    cpus_free: float
    gpus: float
    gpus_free: float


class RayClusterPublic(_Out):
    """The Ray cluster of the ray executor (RAY_ADDRESS), as its dashboard answers now."""

    address: str
    reachable: bool
    detail: str = Field(description="How many nodes are alive, or why the cluster could not be asked.")
    nodes: list[RayNodePublic] = Field(default_factory=list)
    gpus: float = Field(0, description="GPUs of the alive nodes.")
    gpus_free: float = Field(0, description="Of those, the ones no job or task holds now.")


class HostFacts(_Out):
    version: str
    gpus: list[GpuPublic]
    disk: DiskPublic
    workers: list[WorkerPublic] = Field(default_factory=list)
    ray: RayClusterPublic | None = Field(None, description="The Ray cluster, when the ray executor is configured.")


class PlacementPublic(_Out):
    """Where a job runs: its executor, in words, and — for a remote job — what the remote side last said."""

    executor: str
    where: str
    remote_status: str | None = None
    remote_stage: str | None = None
    remote_job_id: str | None = None


class VllmServingPublic(_Out):
    """How to serve a completed job's adapter with vLLM (``vllm serve BASE --enable-lora --lora-modules NAME=PATH``),
    or why vLLM's LoRA loader would refuse it."""

    model: str = Field(description="The name the command serves the adapter as: the job's fine_tuned_model.")
    compatible: bool
    problems: list[str] = Field(description="What vLLM's loader would refuse in the adapter's files; empty when none.")
    command: str | None = Field(description="The command, run on this server's host (the paths are this host's); "
                                            "null when not compatible.")


# --- keys -----------------------------------------------------------------------------------------------------

class KeyCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=100)
    is_admin: bool = False


class KeyPublic(_Out):
    id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(..., description="The key itself; shown once, only a hash is stored.")


# --- datasets -------------------------------------------------------------------------------------------------

class DatasetPublic(_Out):
    id: str
    name: str
    filename: str
    format: str
    rows: int
    size_bytes: int
    sha256: str
    created_at: datetime


class TokenStatsPublic(_Out):
    min: int
    mean: float
    p95: int
    max: int
    truncated: int
    max_seq_length: int


class LengthBucket(_Out):
    start: int   # inclusive
    end: int     # exclusive
    count: int


class ModelRef(_Out):
    id: str
    name: str


class DatasetDetail(DatasetPublic):
    token_stats: TokenStatsPublic | None = None
    token_stats_model: ModelRef | None = None
    token_stats_error: str | None = None
    length_histogram: list[LengthBucket] | None = None
    template_system_prompt: str | None = Field(None, description=(
        "The system message token_stats_model's chat template adds to a conversation that has none (it is in the "
        "token counts, and in training); null when it adds none."))


class PreviewMessage(_Out):
    role: str
    content: str


class PreviewExample(_Out):
    line: int
    messages: list[PreviewMessage]
    templated: bool = Field(True, description="Rendered with the model's chat template (false: the text format, "
                                              "plain text without a template).")


# --- models ---------------------------------------------------------------------------------------------------

REPO_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*/[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
NAME = r"^[^\x00-\x1f\x7f]+$"
MAX_NAME_BYTES = 255   # the longest file or folder name Linux file systems take


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, pattern=NAME)
    source: Literal["local", "huggingface", "modelscope"]
    path: str | None = Field(None, min_length=1, max_length=4096, pattern=NAME,
                             description="source local: the model folder (absolute, or relative to USF_MODEL_PATH).")
    repo_id: str | None = Field(None, max_length=200, pattern=REPO_ID,
                                description="source huggingface/modelscope: org/name, found in the local cache.")

    @field_validator("path")
    @classmethod
    def _short_parts(cls, path: str | None) -> str | None:
        for part in (path or "").split("/"):
            if len(part.encode()) > MAX_NAME_BYTES:
                raise ValueError(f"the folder name {part[:40]!r}… is {len(part.encode())} bytes; a file system takes "
                                 f"at most {MAX_NAME_BYTES} per name")
        return path

    @model_validator(mode="after")
    def _source_fields(self) -> "ModelCreate":
        if self.source == "local" and not self.path:
            raise ValueError("path is required for source 'local'")
        if self.source != "local":
            if not self.repo_id:
                raise ValueError(f"repo_id (org/name) is required for source {self.source!r}")
            if self.path:
                raise ValueError(f"path is only for source 'local'; source {self.source!r} is found by repo_id")
        return self


class ModelPublic(_Out):
    id: str
    name: str
    source: str
    repo_id: str | None
    path: str
    model_type: str | None
    parameters: int | None
    size_bytes: int | None
    valid: bool
    problems: list[str]
    created_at: datetime


class PullCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(..., max_length=200, description="The model on the hub: org/name.")
    source: Literal["huggingface", "modelscope"] = Field(
        "huggingface", description="The hub: the Hugging Face Hub, or ModelScope (the server needs usf-bios[modelscope]).")
    revision: str | None = Field(None, min_length=1, max_length=200,
                                 description="Branch, tag or commit (default: main; master on ModelScope).")
    name: str | None = Field(None, min_length=1, max_length=200, pattern=NAME,
                             description="The registered model's name (default: the repo id).")

    @field_validator("repo_id")
    @classmethod
    def _org_name(cls, value: str) -> str:
        if not re.fullmatch(REPO_ID, value):
            raise ValueError("must be org/name: letters, digits, '.', '_' and '-' on each side of one '/'")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*", value) or ".." in value:
            raise ValueError("must be a branch, tag or commit: letters, digits, '.', '_', '-' and '/'")
        return value


class PullPublic(_Out):
    """A download from a hub the server runs; the model is registered once it is complete."""

    id: str
    repo_id: str
    source: Literal["huggingface", "modelscope"]
    revision: str
    name: str
    status: Literal["running", "completed", "failed"]
    files: int | None = Field(description="Files to fetch (config, tokenizer, weights), once the hub has answered.")
    total_bytes: int | None
    bytes_done: int = Field(description="Bytes in the source's cache so far, partial files included.")
    error: str | None
    model: ModelPublic | None = Field(description="The registered model, once completed.")


class ScanSkipped(_Out):
    path: str
    reason: str


class ScanResult(_Out):
    registered: list[ModelPublic]
    skipped: list[ScanSkipped]


# --- jobs -----------------------------------------------------------------------------------------------------

class ArtifactRef(_Out):
    name: str
    version: int


class JobPublic(_Out):
    id: str
    name: str
    status: JobStatus
    stage: str | None
    progress: float
    current_step: int
    total_steps: int | None
    current_epoch: float
    metrics: dict[str, Any] = Field(description="The newest metric point (step, loss, learning_rate, …).")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    model_id: str | None
    dataset_id: str | None
    num_gpus: int
    executor: str = Field(description="Where the job runs: the executor that started it (local).")
    spec: dict[str, Any] = Field(description="The job spec as it was submitted.")
    artifact: ArtifactRef | None
    resumable: bool = Field(description="Whether resuming can help: cancelled or interrupted, or failed after "
                                        "training began (a failure before it would repeat with the same spec).")


class JobsPublic(_Out):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class JobStatusPublic(_Out):
    """What the live feeds send as ``status`` when it changes."""

    status: JobStatus
    stage: str | None
    progress: float
    current_step: int
    total_steps: int | None
    error: str | None
    attempts: int


class MetricPointPublic(_Out):
    step: int
    epoch: float | None
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens: int | None
    step_seconds: float | None
    tokens_per_second: float | None
    gpu_memory_gb: float | None
    validation_loss: float | None


assert set(METRIC_FIELDS) <= set(MetricPointPublic.model_fields), "a metric measure without a field in the API"


class CheckpointPublic(_Out):
    step: int
    name: str
    size_bytes: int
    created_at: float = Field(description="Unix seconds: the checkpoint folder's modification time.")


class EstimatePublic(_Out):
    examples: int
    tokens_per_epoch: int
    rows_per_epoch: int
    steps: int
    trained_tokens: int
    parameters: int
    lora_parameters: int
    estimated_seconds: float
    peak_vram_gb: float | None
    vram_breakdown_gb: dict[str, float]
    cost: float
    price_per_gpu_hour: float
    gpu_type: str
    assumptions: str
    device: str = Field(description="The device the figures assume: 'the CPU', '1 × H100', …")
    global_batch: int = Field(0, description="Rows one optimizer step trains on: batch_size × "
                              "gradient_accumulation_steps × the job's ranks (GPUs, or num_processes on the CPU).")
    strategy: str = Field("single", description="How the job's ranks split the work: single (one rank), ddp or fsdp "
                          "(the base weights sharded: peak_vram_gb is one GPU's share), as the engine will choose.")
    warning: str | None = Field(None, description="What a submit of this spec would be refused for on this server "
                                                  "(e.g. a GPU asked for on a host without one); null when none.")


# --- presets --------------------------------------------------------------------------------------------------

class PresetPublic(_Out):
    name: str = Field(description="The file's name without .yaml: <model>_<method>.")
    label: str
    summary: str
    command: str = Field(description="The exact command that runs the preset.")
    fields: dict[str, Any] = Field(description="The partial job spec the preset sets.")
