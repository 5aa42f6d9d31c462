"""The OpenAI fine-tuning API under /v1 (files, fine_tuning/jobs, events, checkpoints, cancel) on the same datasets
and jobs as /api: the work is in ``control/openai_ft.py`` and ``control/jobs.py``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from usf_bios.api.deps import LayoutDep, SessionDep, SettingsDep
from usf_bios.api.routes.openai_common import OpenAICaller, OpenAIRoute
from usf_bios.api.uploads import UploadRejected, receive_multipart
from usf_bios.control import datasets, jobs
from usf_bios.control import openai_ft as ft
from usf_bios.control.gpus import list_gpus

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
Limit = Query(20, ge=1, le=100)


@router.post("/files")
async def create_file(request: Request, caller: OpenAICaller, session: SessionDep, layout: LayoutDep,
                      settings: SettingsDep) -> dict[str, Any]:
    """multipart: ``file`` and ``purpose=fine-tune``. Validated like POST /api/datasets: a bad file is 400 naming
    its line; the file becomes a dataset of the caller (its id is the file id)."""
    try:
        received = await receive_multipart(request, layout.uploads, settings.max_upload_mb * 2**20,
                                           check_filename=datasets.check_upload_filename)
    except UploadRejected as exc:
        raise HTTPException(400 if exc.status_code == 415 else exc.status_code, exc.detail) from None
    entry = await run_in_threadpool(lambda: ft.upload_file(session=session, caller=caller, layout=layout,
                                                           upload=received))
    return ft.file_object(entry)


@router.get("/files")
def list_files(caller: OpenAICaller, session: SessionDep, after: str | None = None, limit: int = Query(10_000, ge=1,
               le=10_000), purpose: str | None = None) -> dict[str, Any]:
    items = [] if purpose not in (None, "fine-tune") else [
        ft.file_object(d) for d in datasets.list_datasets(session=session, caller=caller)]  # type: ignore[arg-type]
    return ft.page(items, after, limit)


@router.get("/files/{file_id}")
def get_file(file_id: str, caller: OpenAICaller, session: SessionDep) -> dict[str, Any]:
    return ft.file_object(ft.get_file(session=session, caller=caller, file_id=file_id))


@router.get("/files/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the file's bytes"}})
def file_content(file_id: str, caller: OpenAICaller, session: SessionDep) -> FileResponse:
    entry = ft.get_file(session=session, caller=caller, file_id=file_id)
    return FileResponse(entry.path, filename=entry.filename, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, caller: OpenAICaller, session: SessionDep, layout: LayoutDep) -> dict[str, Any]:
    """409 while a job uses it."""
    entry = ft.get_file(session=session, caller=caller, file_id=file_id)
    datasets.delete_dataset(session=session, layout=layout, entry=entry)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/fine_tuning/jobs")
def create_job(body: ft.FineTuneCreate, request: Request, caller: OpenAICaller, session: SessionDep,
               layout: LayoutDep, settings: SettingsDep) -> dict[str, Any]:
    """The same job as POST /api/jobs would queue (one job store, one lifecycle)."""
    job = ft.create_fine_tune(session=session, caller=caller, layout=layout, settings=settings, body=body,
                              gpus=len(list_gpus()))
    request.app.state.scheduler.wake()
    return ft.job_object(session, job)


@router.get("/fine_tuning/jobs")
def list_jobs(caller: OpenAICaller, session: SessionDep, after: str | None = None, limit: int = Limit) -> dict[str, Any]:
    return ft.list_fine_tunes(session=session, caller=caller, after=after, limit=limit)


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, caller: OpenAICaller, session: SessionDep) -> dict[str, Any]:
    return ft.job_object(session, jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, caller: OpenAICaller, session: SessionDep) -> dict[str, Any]:
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    jobs.cancel_job(session=session, job=job)
    request.app.state.scheduler.wake()
    return ft.job_object(session, job)


@router.get("/fine_tuning/jobs/{job_id}/events")
def job_events(job_id: str, caller: OpenAICaller, session: SessionDep, layout: LayoutDep, after: str | None = None,
               limit: int = Limit) -> dict[str, Any]:
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    return ft.job_events(session=session, layout=layout, job=job, after=after, limit=limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, caller: OpenAICaller, session: SessionDep, layout: LayoutDep,
                    after: str | None = None, limit: int = Limit) -> dict[str, Any]:
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    return ft.job_checkpoints(session=session, layout=layout, job=job, after=after, limit=limit)
