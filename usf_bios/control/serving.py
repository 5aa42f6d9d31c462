"""Which models a caller may talk to (``GET /v1/models``) and what a model name stands for: a registered base model,
or a completed job's adapter on its base. No HTTP here, and no torch: the API hands the answer to the inference
engine (``usf_bios.inference``).

Names (docs/inference.md):
- a registered base model: its name (or id), as in ``/api/models``;
- a completed job's adapter: ``ft:<base model name>:<job name>:<job id>`` (the job's ``fine_tuned_model``); the
  job id alone also works;
- one of its checkpoints: ``ft:<base model name>:<job name>:<job id>:ckpt-step-<N>``.
Only the job id (the last part, or the one before ``ckpt-step-N``) decides; the rest is for people reading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from usf_bios.control.errors import Invalid, NotFound
from usf_bios.control.keys import Caller
from usf_bios.control.models import find_model
from usf_bios.control.tables import Job, ModelEntry
from usf_bios.models.vllm_compat import check_adapter
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout, confine

CHECKPOINT_PREFIX = "ckpt-step-"


@dataclass(frozen=True)
class ServedModel:
    """What a model name resolves to: the base folder, the adapter folder (None: the base alone) and how to load."""

    name: str
    base_path: str
    adapter_path: str | None = None
    quantization: str = "none"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ListedModel:
    id: str
    created: datetime
    kind: str          # base | adapter


def fine_tuned_name(job: Job, base_name: str | None) -> str:
    return f"ft:{base_name or 'model'}:{job.name}:{job.id}"


def base_name_of(session: Session, job: Job) -> str | None:
    model = session.get(ModelEntry, job.model_id) if job.model_id else None
    return model.name if model else None


def list_served(*, session: Session, caller: Caller) -> list[ListedModel]:
    """The caller's valid registered models, then every completed job's adapter, oldest first."""
    models = session.scalars(caller.scope(select(ModelEntry).where(ModelEntry.valid.is_(True)), ModelEntry.owner_key_id)
                             .order_by(ModelEntry.created_at))
    out = [ListedModel(m.name, m.created_at, "base") for m in models]
    names = {m.id: m.name for m in session.scalars(caller.scope(select(ModelEntry), ModelEntry.owner_key_id))}
    jobs = session.scalars(caller.scope(select(Job).where(Job.status == JobStatus.COMPLETED.value), Job.owner_key_id)
                           .order_by(Job.created_at))
    out += [ListedModel(fine_tuned_name(j, names.get(j.model_id or "")), j.finished_at or j.created_at, "adapter")
            for j in jobs]
    return out


def _job_and_checkpoint(ref: str) -> tuple[str, int | None]:
    parts = ref.split(":")
    if len(parts) >= 2 and parts[-1].startswith(CHECKPOINT_PREFIX) and parts[-1][len(CHECKPOINT_PREFIX):].isdigit():
        return parts[-2], int(parts[-1][len(CHECKPOINT_PREFIX):])
    return parts[-1], None


def resolve_served(*, session: Session, caller: Caller, layout: StorageLayout, ref: str) -> ServedModel:
    """The base model or adapter ``ref`` names among what the caller may see; NotFound (the same for another key's
    and a missing one) or Invalid (a job that has not completed, a model that is not usable)."""
    if "\x00" in ref or not ref:
        raise NotFound("model", ref)
    if not ref.startswith("ft:"):
        model = find_model(session, caller, ref)
        if model is not None:
            if not model.valid:
                raise Invalid("model", f"model {model.name!r} is not usable: {'; '.join(model.problems)}")
            return ServedModel(name=model.name, base_path=model.path)
    job_id, step = _job_and_checkpoint(ref.removeprefix("ft:") if ref.startswith("ft:") else ref)
    job = session.get(Job, job_id) if job_id else None
    if job is None or not caller.can_see(job.owner_key_id):
        raise NotFound("model", ref)
    spec = job.spec or {}
    if step is None:
        if job.status != JobStatus.COMPLETED.value:
            raise Invalid("model", f"job {job.id} is {job.status}; its model exists once it succeeds")
        folder = layout.job_output(job.id)
    else:
        folder = confine(layout.job_checkpoints(job.id), f"checkpoint-{step}")
    if not (Path(folder) / "adapter_config.json").is_file():
        raise NotFound("model", ref)
    hyper = spec.get("hyperparameters") or {}
    return ServedModel(name=ref, base_path=str(spec.get("base_model")), adapter_path=str(folder),
                       quantization=str(hyper.get("quantization", "none")),
                       trust_remote_code=bool(spec.get("trust_remote_code", False)))


@dataclass(frozen=True)
class VllmServing:
    """How a completed job's adapter is served by vLLM: the command, or why vLLM's loader would refuse it."""

    model: str
    compatible: bool
    problems: list[str]
    command: str | None


def vllm_serving(*, session: Session, caller: Caller, layout: StorageLayout, job: Job) -> VllmServing:
    """The ``vllm serve … --enable-lora --lora-modules NAME=PATH`` line for the job's adapter (NAME: its
    ``fine_tuned_model``), checked against what vLLM's LoRA loader requires (models/vllm_compat.py)."""
    served = resolve_served(session=session, caller=caller, layout=layout, ref=f"ft:{job.id}")
    assert served.adapter_path is not None
    check = check_adapter(Path(served.adapter_path))
    name = fine_tuned_name(job, base_name_of(session, job))
    command = check.command(served.base_path, name, served.adapter_path, served.quantization) if check.compatible else None
    return VllmServing(model=name, compatible=check.compatible, problems=check.problems, command=command)
