"""A job's folder before any training: its id and its locked spec (no torch needed here)."""

from __future__ import annotations

import secrets
import time

from usf_bios.spec import JobSpec, load_spec
from usf_bios.storage import StorageLayout


class ResumeRefused(ValueError):
    """The job cannot continue as asked (changed dataset or spec, unknown job, already done)."""


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create_job(spec: JobSpec, layout: StorageLayout, job_id: str | None = None) -> str:
    """Give the job an id and lock its spec into ``data/output/{job_id}/job.yaml``."""
    layout.ensure()
    job_id = job_id or new_job_id(spec.name)
    folder = layout.job_output(job_id)
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "job.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    return job_id


def locked_spec(job_id: str, layout: StorageLayout) -> JobSpec:
    path = layout.job_spec(job_id)
    if not path.is_file():
        raise ResumeRefused(f"no job {job_id!r}: {path} does not exist")
    return load_spec(path)
