"""Jobs: create, estimate, list, inspect, cancel, resume, metrics, logs, checkpoints, download, live events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket, WebSocketDisconnect, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from usf_bios.api.deps import Caller, CurrentCaller, LayoutDep, SessionDep, SettingsDep, get_ws_caller
from usf_bios.api.tarstream import tar_stream
from usf_bios.control.estimate import estimate_job
from usf_bios.control.follow import METRIC_FIELDS
from usf_bios.control.jobs import JobRequestError, cancel_job, job_public, resolve_references, resume_job, submit_job
from usf_bios.control.lifecycle import InvalidTransition, JobStatus
from usf_bios.control.tables import Artifact, Job, MetricPoint, ModelEntry
from usf_bios.control.token_lengths import token_lengths_future
from usf_bios.engine.checkpoint import list_checkpoints, read_state
from usf_bios.engine.events import parse_event
from usf_bios.spec import JobSpec
from usf_bios.storage import StorageLayout

router = APIRouter(tags=["jobs"])


def _job_or_404(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id) if "\x00" not in job_id else None
    if job is None or not caller.can_see(job.owner_key_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


def _public(session: Session, job: Job) -> dict[str, Any]:
    return job_public(job, session.scalar(select(Artifact).where(Artifact.job_id == job.id)))


@router.post("/jobs", status_code=status.HTTP_201_CREATED,
             responses={422: {"description": "invalid spec, or a model/dataset that is not registered: "
                                             '{"detail", "errors": [{"field", "message"}]}'}})
def create(spec: JobSpec, request: Request, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
           settings: SettingsDep) -> dict[str, Any]:
    """Queue a job. `base_model` and `dataset` name a registered model and dataset (id or name)."""
    job = submit_job(session, caller, layout, settings, spec)   # JobRequestError → 422 (api/main.py)
    request.app.state.scheduler.wake()
    return _public(session, job)


@router.post("/jobs/estimate",
             responses={422: {"description": "invalid spec, unknown model/dataset, a dataset not in `dataset_format`, "
                                             'or a model that cannot tokenize it: {"detail", "errors": [{"field", "message"}]}'}})
async def estimate(spec: JobSpec, caller: CurrentCaller, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Tokens, steps, time, peak GPU memory and cost, before anything runs. The dataset's token lengths are
    computed once per (dataset file, model, format) and shared with the dataset stats (control/token_lengths.py)."""
    model, dataset = await run_in_threadpool(resolve_references, session, caller, spec)
    pending = await run_in_threadpool(token_lengths_future, dataset, model, spec.dataset_format, spec.trust_remote_code)
    lengths = await asyncio.wrap_future(pending)   # waits without holding a thread
    return await run_in_threadpool(_estimate, spec, model, lengths, settings.gpu_prices)


def _estimate(spec: JobSpec, model: ModelEntry, lengths: Sequence[int], prices: dict[str, float]) -> dict[str, Any]:
    try:
        return estimate_job(spec, lengths, Path(model.path), model.parameters or 0, prices).as_dict()
    except (OSError, json.JSONDecodeError) as exc:
        raise JobRequestError("base_model", f"model {model.name!r}: cannot read its config.json ({exc})") from None


def find_jobs(session: Session, caller: Caller, statuses: Iterable[JobStatus] | None = None, limit: int = 50,
              offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The caller's jobs (with these statuses), newest first, as the API shows them; and how many match."""
    query = caller.scope(select(Job), Job.owner_key_id)
    if statuses is not None:
        query = query.where(Job.status.in_([s.value for s in statuses]))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    return [_public(session, j) for j in jobs], total


@router.get("/jobs")
def list_jobs(caller: CurrentCaller, session: SessionDep, status_filter: JobStatus | None = Query(None, alias="status"),
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict[str, Any]:
    items, total = find_jobs(session, caller, None if status_filter is None else [status_filter], limit, offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, caller: CurrentCaller, session: SessionDep) -> dict[str, Any]:
    return _public(session, _job_or_404(session, caller, job_id))


def _change(request: Request, session: Session, caller: Caller, job_id: str, action: Any) -> dict[str, Any]:
    """Apply ``action`` (cancel_job, resume_job) to the caller's job; 409 when its status forbids it."""
    job = _job_or_404(session, caller, job_id)
    try:
        action(session, job)
    except InvalidTransition as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    request.app.state.scheduler.wake()
    return _public(session, job)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep) -> dict[str, Any]:
    """Queued: cancelled at once. Running: SIGTERM (a checkpoint is saved), SIGKILL after USF_CANCEL_GRACE_S."""
    return _change(request, session, caller, job_id, cancel_job)


@router.post("/jobs/{job_id}/resume")
def resume(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep) -> dict[str, Any]:
    """Cancelled, failed or interrupted: queued again; the engine continues from the newest checkpoint."""
    return _change(request, session, caller, job_id, resume_job)


@router.get("/jobs/{job_id}/metrics")
def metrics(job_id: str, caller: CurrentCaller, session: SessionDep) -> list[dict[str, Any]]:
    """One point per step, as the engine's metric events and evaluations reported it; `tokens` (the step's real
    tokens) and `step_seconds` are null on points recorded before schema revision 0002."""
    job = _job_or_404(session, caller, job_id)
    points = session.scalars(select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(MetricPoint.step))
    fields = ("step", *METRIC_FIELDS, "validation_loss")
    return [{f: getattr(p, f) for f in fields} for p in points]


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
def logs(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
         tail: int = Query(200, ge=1, le=100_000)) -> str:
    job = _job_or_404(session, caller, job_id)
    path = layout.job_log(job.id)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-tail:]) + "\n"


@router.get("/jobs/{job_id}/checkpoints")
def checkpoints(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> list[dict[str, Any]]:
    job = _job_or_404(session, caller, job_id)
    out = []
    for folder in list_checkpoints(layout.job_checkpoints(job.id)):
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        out.append({"step": read_state(folder).step, "name": folder.name, "size_bytes": size,
                    "created_at": folder.stat().st_mtime})
    return out


@router.get("/jobs/{job_id}/download")
def download(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> StreamingResponse:
    """The output folder (adapter, tokenizer, job.yaml, logs of training) as a streamed tar."""
    job = _job_or_404(session, caller, job_id)
    if job.status != JobStatus.COMPLETED.value:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.status}; the adapter exists once it completes")
    headers = {"Content-Disposition": f'attachment; filename="{job.id}.tar"'}
    return StreamingResponse(tar_stream(layout.job_output(job.id), job.id), media_type="application/x-tar", headers=headers)


# -- live events ---------------------------------------------------------------------------------------
async def _event_feed(app: Any, layout: StorageLayout, job_id: str, since: int) -> Any:
    """Yield (line_number, event) from the job's events file after ``since``, then ('status', row) changes,
    until the job is final and every line has been sent. Line numbers are stable ids for reconnecting."""
    path, offset, line_no, last_status = layout.job_events(job_id), 0, -1, None
    while True:
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            end = chunk.rfind(b"\n")
            if end >= 0:
                offset += end + 1
                for raw in chunk[:end].split(b"\n"):
                    line_no += 1
                    event = parse_event(raw) if line_no > since else None
                    if event is not None:
                        yield line_no, event
        row = await run_in_threadpool(_status_row, app, job_id)
        if row != last_status:
            last_status = row
            yield "status", row
        if row is None or JobStatus(row["status"]).is_terminal:
            return
        await asyncio.sleep(0.25)


def _status_row(app: Any, job_id: str) -> dict[str, Any] | None:
    with app.state.db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return {"status": job.status, "stage": job.stage, "progress": job.progress, "current_step": job.current_step,
                "total_steps": job.total_steps, "error": job.error, "attempts": job.attempts}


@router.get("/jobs/{job_id}/events")
async def events(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
                 since: int = Query(-1, ge=-1, description="Last event id already seen (or send Last-Event-ID).")
                 ) -> StreamingResponse:
    """Server-Sent Events: every event of the job so far, then new ones as they come. Each engine event
    carries its line number as `id`; reconnecting with Last-Event-ID resumes after it."""
    job = _job_or_404(session, caller, job_id)
    header = request.headers.get("last-event-id")
    start = int(header) if header and header.isdigit() else since

    async def stream() -> Any:
        yield "retry: 1000\n\n"
        async for key, event in _event_feed(request.app, layout, job.id, start):
            if await request.is_disconnected():
                return
            if key == "status":
                yield f"event: status\ndata: {json.dumps(event)}\n\n"
            else:
                yield f"id: {key}\nevent: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.websocket("/jobs/{job_id}/ws")
async def websocket(websocket: WebSocket, job_id: str, since: int = -1) -> None:
    """The same feed as /events, one JSON message each: {"id": n, ...event} or {"type": "status", ...}."""
    with websocket.app.state.db.session() as session:
        try:
            caller = get_ws_caller(websocket, session)
            job = _job_or_404(session, caller, job_id)
        except HTTPException as err:  # accept first: a close code (4401, 4404) only exists on an open socket
            await websocket.accept()
            await websocket.close(code=4000 + err.status_code, reason=str(err.detail))
            return
    await websocket.accept()
    try:
        async for key, event in _event_feed(websocket.app, websocket.app.state.layout, job.id, since):
            message = {"type": "status", **event} if key == "status" else {"id": key, **event}
            await websocket.send_text(json.dumps(message, default=str))
        await websocket.close()
    except WebSocketDisconnect:
        return
