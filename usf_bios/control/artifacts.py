"""A finished job's adapter as an artifact row: version N of its job name, per owner."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from usf_bios.control.keys import owned_by
from usf_bios.control.tables import Artifact, Job
from usf_bios.models.inspect import folder_size
from usf_bios.storage import StorageLayout


def record_artifact(session: Session, layout: StorageLayout, job: Job) -> Artifact:
    """The completed job's output folder as the next version of its name (for the job's owner)."""
    folder = layout.job_output(job.id)
    query = select(func.max(Artifact.version)).where(Artifact.name == job.name,
                                                     owned_by(Artifact.owner_key_id, job.owner_key_id))
    latest = session.scalar(query)
    artifact = Artifact(job_id=job.id, name=job.name, version=(latest or 0) + 1, path=str(folder),
                        size_bytes=folder_size(folder), owner_key_id=job.owner_key_id)
    session.add(artifact)
    return artifact
