"""Merge and export a completed job's adapter in the background: start, follow, download (control/exports.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep
from usf_bios.api.tarstream import tar_stream
from usf_bios.control import exports, jobs
from usf_bios.control.errors import Conflict

router = APIRouter(tags=["jobs"])


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gguf: bool = False
    gguf_dtype: Literal["bf16", "f16"] = "bf16"


@router.post("/jobs/{job_id}/export", status_code=status.HTTP_202_ACCEPTED)
def start(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
          body: ExportCreate | None = None) -> dict[str, Any]:
    """Merge the adapter into its base (bf16 safetensors folder; with ``gguf`` also a GGUF file) in a background
    process; 409 until the job has completed or while an export of it runs. Follow it with GET."""
    body = body or ExportCreate()
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    return exports.start_export(layout=layout, job=job, gguf=body.gguf, gguf_dtype=body.gguf_dtype)


@router.get("/jobs/{job_id}/export")
def state(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> dict[str, Any]:
    """``{state: none|running|completed|failed, stage, progress, error, files}``."""
    return exports.export_status(layout=layout, job=jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.get("/jobs/{job_id}/export/download", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "the export as a tar"}})
def download(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> StreamingResponse:
    """The merged folder (and the GGUF file) as a streamed tar; 409 until the export has completed."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    if exports.export_status(layout=layout, job=job)["state"] != "completed":
        raise Conflict(f"job {job.id} has no completed export (POST /api/jobs/{job.id}/export)")
    headers = {"Content-Disposition": f'attachment; filename="{job.id}-export.tar"'}
    return StreamingResponse(tar_stream(exports.export_folder(layout, job), f"{job.id}-export"),
                             media_type="application/x-tar", headers=headers)
