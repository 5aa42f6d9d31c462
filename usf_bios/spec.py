"""The job spec: the one contract read by the CLI (YAML), REST and the GPU worker (JSON).

Unknown keys and out-of-range values are refused with the field's path, for example
``hyperparameters.lora_r: must be ≥ 1``. Types are strict: a boolean is not a number (``max_steps: true`` is
refused, not taken as 1), a string is not a number, an integer field takes no fraction; a float field takes
an integer (``learning_rate: 1``). Every float is finite and every number has an upper bound, so no value
overflows what stores or computes it. YAML is read with YAML 1.2's floats: ``2e-4`` is a number (PyYAML's
YAML 1.1 would read it as a string).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from usf_bios.datasets.formats import FORMATS

Quantization = Literal["none", "4bit", "8bit"]
Scheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
DatasetFormatName = Literal[("auto", *FORMATS)]  # type: ignore[valid-type]  # the parser's formats, one list


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


class Hyperparameters(_Strict):
    num_epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps to run; wins over num_epochs.")
    learning_rate: float = Field(2.0e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(4, ge=1, le=4096, description="Rows per micro-batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(2048, ge=8, le=1_048_576, description="Tokens per example (and per packed row); longer ones are truncated.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, le=16384, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names, such as [q_proj, v_proj]."
    )
    quantization: Quantization = Field("none", description="Load the base model in 4-bit (QLoRA, nf4) or 8-bit; CUDA only.")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay on the LoRA weights.")
    packing: bool = Field(True, description="Pack several examples into one row; they never attend to each other.")
    train_on_inputs: bool = Field(False, description="Also train on system and user tokens, not only assistant tokens.")
    val_split: float = Field(0.05, ge=0, le=0.5, description="Fraction of examples held out for validation.")
    eval_steps: int = Field(50, ge=1, le=10_000_000, description="Evaluate on the validation split every N optimizer steps.")
    save_steps: int = Field(100, ge=1, le=10_000_000, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass to save memory.")
    precision: Precision = Field("auto", description="auto = bf16 where the GPU supports it, else fp32.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, validation split, LoRA init and dropout.")
    max_grad_norm: float = Field(1.0, gt=0, le=1_000_000, description="Gradient clipping threshold.")

    @field_validator("target_modules")
    @classmethod
    def _modules_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one module, or be 'all-linear'")
            if any(not isinstance(m, str) or not m.strip() for m in value):
                raise ValueError("module names must be non-empty strings")
        return value


Switch = Literal["auto", "on", "off"]


class Performance(_Strict):
    """How the engine computes, never what it learns: every choice here gives the same losses and gradients.

    'auto' picks the fastest path this machine supports (see docs/benchmarks.md); the engine logs what it chose.
    """

    attention: Literal["auto", "sdpa", "varlen"] = Field(
        "auto", description="varlen: one variable-length attention call over packed examples (flash kernel on CUDA), "
        "no mask; sdpa: PyTorch SDPA with a block-diagonal mask.")
    loss: Literal["auto", "full", "chunked", "fused"] = Field(
        "auto", description="full: whole logits; chunked: cross-entropy in slices so the logits never exist whole; "
        "fused: Liger's fused linear cross-entropy (CUDA, liger-kernel). auto: fused where Liger is installed on a "
        "CUDA GPU, except with checkpointing offload (long contexts), else chunked.")
    fused_kernels: Switch = Field("auto", description="Liger kernels for RMSNorm, RoPE and SwiGLU (CUDA, liger-kernel).")
    fused_optimizer: Switch = Field("auto", description="AdamW in one fused kernel (CUDA).")
    fused_lora: Switch = Field("auto", description="Each LoRA layer as one autograd function: the scale folded into "
                               "the matrix product, no fp32 round trip of the input, no extra adds.")
    compile: Switch = Field(
        "off", description="torch.compile each decoder layer (one compiled graph shared by all layers). auto is off: "
        "measured 5% slower than eager on Llama-3.1-8B (H200); the first steps take longer while it compiles. Liger's "
        "kernels (fused_kernels) do not work inside compiled layers, so compile on leaves them out.")
    merge_micro_batches: Switch = Field(
        "auto", description="With packing, varlen attention and checkpointing auto on a GPU: the rows of one optimizer "
        "step go through the model in as few passes as free GPU memory holds without recomputation (the gradient is "
        "a sum over tokens, so it is unchanged). Memory use grows towards what is free on the card; off keeps the "
        "configured micro-batches and the smallest footprint (Llama-3.1-8B on an H200: 6% slower, 36 GB instead of "
        "91 GB); on also merges the passes of a plan that recomputes every layer (checkpointing all or offload).")
    checkpointing: Literal["auto", "all", "offload"] = Field(
        "auto", description="With gradient_checkpointing on: auto recomputes only as many layers as GPU memory needs "
        "(quantized models too; every layer on the CPU); all recomputes every layer (the smallest footprint); offload "
        "also keeps in host memory the saved layer inputs that do not fit on the GPU, copied while the layers compute "
        "(longest contexts).")
    host_embeddings: Switch = Field(
        "auto", description="Keep the frozen input embedding table in host memory and copy each pass's rows to the "
        "GPU (1.05 GB less GPU memory for Llama-3.1-8B). auto: on a GPU with checkpointing all or offload (the "
        "small-footprint plans); a table tied to the output layer, or trained, or a job of several ranks keeps it on "
        "the GPU.")


class GpuConfig(_Strict):
    num_gpus: int = Field(1, ge=0, le=64, description="GPUs for the job; 0 = train on the CPU.")
    gpu_type: str = Field("any", min_length=1, max_length=64, description="GPU model wanted, or 'any'.")
    executor: Literal["default", "local", "remote", "ray"] = Field(
        "default", description="Where the job runs: default = the server's USF_EXECUTOR; local = a process on the "
        "server's host; remote = the GPU worker or RunPod endpoint at GPU_CLUSTER_API_URL; ray = the Ray cluster at "
        "RAY_ADDRESS. How a job is run, not what it learns: left out of the resume check.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How a job of several ranks splits the work: ddp = a whole model copy on each rank, "
        "gradients averaged; fsdp = FSDP2, the base weights sharded over the ranks (for a model one GPU cannot "
        "hold); auto = ddp when the model fits one GPU, else fsdp (the log says why). One rank: ignored.")
    num_processes: int | None = Field(
        None, ge=1, le=512, description="Ranks of the job: by default one per GPU (one on the CPU). With num_gpus: 0, "
        "more than one trains data-parallel on the CPU (gloo) — for tests and small models; with GPUs it must "
        "equal num_gpus.")
    num_nodes: int = Field(1, ge=1, le=64, description="Hosts the job's ranks are spread over (the Ray executor "
                           "only); num_gpus (or num_processes) must divide evenly among them.")

    @model_validator(mode="after")
    def _ranks_fit(self) -> "GpuConfig":
        if self.num_gpus and self.num_processes not in (None, self.num_gpus):
            raise ValueError(f"num_processes ({self.num_processes}) must equal num_gpus ({self.num_gpus}) on GPUs: "
                             "one rank per GPU")
        if self.world_size % self.num_nodes:
            raise ValueError(f"{self.world_size} rank(s) do not divide evenly over num_nodes: {self.num_nodes}")
        if self.num_nodes > 1 and self.executor not in ("default", "ray"):
            raise ValueError(f"num_nodes: {self.num_nodes} needs the Ray executor (executor: ray); the {self.executor} "
                             "executor runs a job on one host")
        return self

    @property
    def world_size(self) -> int:
        """The job's ranks: one per GPU, or num_processes on the CPU (one by default)."""
        return self.num_gpus or self.num_processes or 1


class DatasetRef(_Strict):
    """One dataset of a job's mixture."""

    name: str = Field(..., min_length=1, description="Registered dataset id/name or a file path.")
    weight: float = Field(1.0, gt=0, le=1000, description="Sampling weight: each epoch trains on weight × this "
                          "dataset's training examples (2 = each twice, 0.5 = a seeded half of them).")


ReportTo = Literal["tensorboard", "mlflow", "wandb"]


def _field_fault(kind: str, field: str, data: object, reason: str = "") -> dict[str, Any]:
    """One of pydantic's line errors, for a fault the model validator finds (so it names its field)."""
    fault: dict[str, Any] = {"type": kind, "loc": (field,), "input": data}
    if kind == "value_error":
        fault["ctx"] = {"error": reason}
    return fault


class JobSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Job name: letters, digits, '.', '_' and '-'.")
    base_model: str = Field(..., min_length=1, description="Registry name ({org}--{model}), org/name in a cache, or a folder path.")
    dataset: str | None = Field(None, min_length=1, description="Registered dataset id/name or a file path "
                                "(or give datasets: several, with sampling weights).")
    datasets: list[DatasetRef] | None = Field(
        None, min_length=1, max_length=64, description="Several datasets mixed with sampling weights, instead of "
        "dataset: [{name, weight}]; each is found and validated like dataset, with dataset_format for all of them.")
    dataset_format: DatasetFormatName = Field("auto", description="Row format; auto detects it from the first row.")
    trust_remote_code: bool = Field(False, description="Run the model's own Python code (only for models that need it).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    gpu_config: GpuConfig = Field(default_factory=GpuConfig)
    performance: Performance = Field(default_factory=Performance)
    report_to: list[ReportTo] = Field(
        default_factory=list, max_length=3, description="Also send the metrics to: tensorboard (event files next to "
        "the job's log), mlflow (MLFLOW_TRACKING_URI, else a file store under the storage root), wandb (needs "
        "WANDB_API_KEY or WANDB_MODE). Each needs its extra: pip install 'usf-bios[tensorboard]'.")

    @model_validator(mode="wrap")
    @classmethod
    def _one_dataset_form(cls, data: Any, handler: Any) -> "JobSpec":
        """Exactly one of dataset and datasets, each fault named by its field (with the other faults, if any)."""
        faults: list[dict[str, Any]] = []
        if isinstance(data, dict):
            given = [key for key in ("dataset", "datasets") if data.get(key) is not None]
            if not given:
                faults.append(_field_fault("missing", "dataset", data))
            elif len(given) == 2:
                faults.append(_field_fault("value_error", "datasets", data, "give dataset or datasets, not both"))
        try:
            spec = handler(data)
        except ValidationError as err:
            if not faults:
                raise
            raise ValidationError.from_exception_data(err.title, [*err.errors(), *faults]) from None  # type: ignore[list-item]
        if faults:
            raise ValidationError.from_exception_data(cls.__name__, faults)  # type: ignore[arg-type]
        return spec

    @field_validator("report_to")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a tool more than once")
        return value

    def dataset_refs(self) -> list[tuple[str, float]]:
        """(name, weight) of each dataset: the one ``dataset`` at weight 1, or the ``datasets`` mixture."""
        if self.datasets is not None:
            return [(ref.name, ref.weight) for ref in self.datasets]
        assert self.dataset is not None   # the model validator holds one of them
        return [(self.dataset, 1.0)]

    @property
    def global_batch(self) -> int:
        """Rows one optimizer step trains on: batch_size × gradient_accumulation_steps × the job's ranks."""
        hp = self.hyperparameters
        return hp.batch_size * hp.gradient_accumulation_steps * self.gpu_config.world_size

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """A hash of everything that decides what is learned (the name, the performance switches, the executor and
        report_to are left out, and how ranks are placed: a checkpoint records its world size itself; a spec of one
        ``dataset`` hashes as before ``datasets`` existed)."""
        data = self.model_dump(mode="json", exclude={"name": True, "performance": True,
                                                     "gpu_config": {"executor", "strategy", "num_processes", "num_nodes"},
                                                     "report_to": True})
        data.pop("datasets" if self.datasets is None else "dataset")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class SpecError(ValueError):
    """A job spec that does not validate; ``problems`` holds one 'field.path: reason' per fault."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid job spec{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


def _got(value: Any) -> str:
    """' (got true)': what was given, as JSON, shortened."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = type(value).__name__
    return f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"


_TYPE_REASONS = {"int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
                 "string_type": "must be a string", "list_type": "must be a list",
                 "model_type": "must be a mapping of fields", "dict_type": "must be a mapping of fields"}


def _reason(error: dict[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind in _TYPE_REASONS:
        given = error.get("input")
        if kind == "float_type" and isinstance(given, int) and not isinstance(given, bool):
            return "must be a finite number (too large)"
        return _TYPE_REASONS[kind] + ("" if kind in ("model_type", "dict_type") else _got(given))
    if kind == "finite_number":
        return "must be a finite number" + _got(error.get("input"))
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return "may hold only letters, digits, '.', '_' and '-', starting with a letter or digit"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "json_invalid":
        return f"malformed JSON: {ctx.get('error', error['msg'])}"
    return error["msg"][0].lower() + error["msg"][1:]


def field_errors(errors: list[Any], where: str = "spec", skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """pydantic's errors as [{"field": "hyperparameters.lora_r", "message": "must be ≥ 1"}], one per fault: the
    location without the branch names a union adds ('all-linear' | list) or the parts in ``skip`` (FastAPI's
    'body'); ``where`` names a fault of the whole (malformed JSON, a missing body)."""
    out: list[dict[str, str]] = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in skip and not str(p).startswith(("literal[", "list["))]
        item = {"field": where if error.get("type") == "json_invalid" else ".".join(loc) or where,
                "message": _reason(error)}
        if item not in out:
            out.append(item)
    return out


def format_validation_error(err: ValidationError) -> list[str]:
    """Render pydantic's errors as 'hyperparameters.lora_r: must be ≥ 1'."""
    return [f"{e['field']}: {e['message']}" for e in field_errors(err.errors())]


def parse_spec(data: object, source: str | None = None) -> JobSpec:
    """Validate a mapping (from YAML, JSON or a request body) into a JobSpec."""
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping of fields, got {type(data).__name__}"], source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err), source) from None


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``2e-4`` and ``1E5`` are numbers, not strings."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_spec(path: str | Path, preset: str | None = None) -> JobSpec:
    """Read a spec from a YAML or JSON file; with ``preset`` (a file of usf_bios/presets) its fields are the
    defaults and the file's own fields win."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(["file not found"], str(path)) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (safe)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError([f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}"], str(path)) from None
    if preset is not None and isinstance(data, dict):
        from usf_bios.presets import PresetError, get_preset

        try:
            data = get_preset(preset).apply(data)
        except PresetError as err:
            raise SpecError([f"--preset: {err}"], str(path)) from None
    return parse_spec(data, str(path))


def diff_specs(old: JobSpec, new: JobSpec) -> list[str]:
    """Fields that differ, as 'hyperparameters.learning_rate: 0.0002 → 0.001' (the name is left out)."""
    changes: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            changes.append(f"{prefix}: {a!r} → {b!r}")

    walk(old.model_dump(mode="json", exclude={"name"}), new.model_dump(mode="json", exclude={"name"}), "")
    return changes
