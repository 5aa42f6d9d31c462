"""Jobs: create, estimate, list, inspect, cancel, resume, delete, metrics, logs, checkpoints, download, live events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket, WebSocketDisconnect, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep, SettingsDep, get_ws_caller
from usf_bios.api.feeds import follow_job
from usf_bios.api.reads import MAX_OFFSET
from usf_bios.api.tarstream import tar_stream
from usf_bios.control import jobs, serving
from usf_bios.control.errors import DomainError, NotFound
from usf_bios.control.keys import Caller
from usf_bios.control.lifecycle import JobStatus
from usf_bios.control.schemas import (CheckpointPublic, EstimatePublic, JobPublic, JobsPublic, MetricPointPublic,
                                      PlacementPublic, VllmServingPublic)
from usf_bios.control.tables import Job
from usf_bios.control.token_lengths import token_lengths_future
from usf_bios.spec import JobSpec

router = APIRouter(tags=["jobs"])
INVALID = {422: {"description": 'an invalid spec, or a model or dataset that cannot be used: {"detail", "errors": '
                                '[{"field", "message"}]}'}}


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobPublic, responses=INVALID)
def create(spec: JobSpec, request: Request, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
           settings: SettingsDep) -> JobPublic:
    """Queue a job. `base_model` and `dataset` name a registered model and dataset (id or name). Refused with a
    422 naming the field, before anything is queued, when the executor could not run it (more GPUs than it has, a
    quantized model without a GPU or without bitsandbytes)."""
    job = jobs.submit_job(session=session, caller=caller, layout=layout, settings=settings, spec=spec,
                          executors=request.app.state.scheduler.executors)
    request.app.state.scheduler.wake()
    return jobs.job_public(session, job)


@router.post("/jobs/estimate", response_model=EstimatePublic, responses=INVALID)
async def estimate(spec: JobSpec, request: Request, caller: CurrentCaller, session: SessionDep,
                   settings: SettingsDep) -> EstimatePublic:
    """Tokens, steps, time, peak GPU memory and cost, before anything runs. The dataset's token lengths are
    computed once per (dataset file, model, format) and shared with the dataset stats (control/token_lengths.py).
    `device` names the device the figures assume; `warning` what a submit of the spec would be refused for on this
    server (a GPU asked for on a host without one), while the estimate still answers."""
    model, dataset = await run_in_threadpool(lambda: jobs.resolve_references(session=session, caller=caller, spec=spec))
    executors = request.app.state.scheduler.executors
    if spec.datasets is None:
        pending = await run_in_threadpool(token_lengths_future, dataset, model, spec.dataset_format)
        lengths = await asyncio.wrap_future(pending)   # waits without holding a thread
        return await run_in_threadpool(jobs.estimate, spec, model, lengths, settings, None, None, executors)
    mixture = await run_in_threadpool(lambda: jobs.resolve_datasets(session=session, caller=caller, spec=spec))
    all_lengths: list[int] = []
    sources: list[int] = []
    for index, (entry, _weight) in enumerate(mixture):
        pending = await run_in_threadpool(token_lengths_future, entry, model, spec.dataset_format)
        part = await asyncio.wrap_future(pending)
        all_lengths += list(part)
        sources += [index] * len(part)
    weights = [weight for _, weight in mixture]
    return await run_in_threadpool(jobs.estimate, spec, model, all_lengths, settings, sources, weights, executors)


@router.get("/jobs", response_model=JobsPublic)
async def list_jobs(request: Request, caller: CurrentCaller,
                    status_filter: JobStatus | None = Query(None, alias="status"),
                    limit: int = Query(50, ge=1, le=jobs.MAX_LIST),
                    offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> Response:
    """Newest first. Mostly answered by api/reads.py before it gets here; the same cached page either way."""
    page = await request.app.state.reads.job_page(caller, status_filter, limit, offset)
    return Response(page, media_type="application/json")


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, caller: CurrentCaller, session: SessionDep) -> JobPublic:
    return jobs.job_public(session, jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.get("/jobs/{job_id}/placement", response_model=PlacementPublic)
def placement(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep) -> PlacementPublic:
    """Where the job runs (local process, worker URL, RunPod endpoint) and what a remote side last said."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    return jobs.job_placement(job, request.app.state.scheduler.executors)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep) -> JobPublic:
    """Queued: cancelled at once. Running: SIGTERM (a checkpoint is saved), SIGKILL after USF_CANCEL_GRACE_S."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    jobs.cancel_job(session=session, job=job)     # Conflict (409) when its status forbids it
    request.app.state.scheduler.wake()
    return jobs.job_public(session, job)


@router.post("/jobs/{job_id}/resume", response_model=JobPublic)
def resume(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep) -> JobPublic:
    """Cancelled, failed or interrupted: queued again; the engine continues from the newest checkpoint."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    jobs.resume_job(session=session, job=job)
    request.app.state.scheduler.wake()
    return jobs.job_public(session, job)


@router.delete("/jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={409: {"description": "the job is not final: cancel it first"}})
def delete(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> None:
    """A final job (completed, failed, cancelled): its row, metric points, artifact and files (adapter,
    checkpoints, log). 409 while it is queued or running."""
    jobs.delete_job(session=session, layout=layout, job=jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.get("/jobs/{job_id}/metrics", response_model=list[MetricPointPublic])
def metrics(job_id: str, caller: CurrentCaller, session: SessionDep) -> list[MetricPointPublic]:
    """One point per step, as the engine's metric events and evaluations reported it; `tokens` (the step's real
    tokens) and `step_seconds` are null on points recorded before schema revision 0002."""
    return jobs.job_metrics(session=session, job=jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
def logs(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
         tail: int = Query(200, ge=1, le=100_000)) -> str:
    return jobs.job_log_tail(layout=layout, job=jobs.get_job(session=session, caller=caller, job_id=job_id), lines=tail)


@router.get("/jobs/{job_id}/checkpoints", response_model=list[CheckpointPublic])
def checkpoints(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> list[CheckpointPublic]:
    return jobs.job_checkpoints(layout=layout, job=jobs.get_job(session=session, caller=caller, job_id=job_id))


@router.get("/jobs/{job_id}/download", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "the output folder as a tar"}})
def download(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> StreamingResponse:
    """The output folder (adapter, tokenizer, job.yaml, logs of training) as a streamed tar; in job.yaml the model
    and dataset paths are relative to the storage root."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    folder = jobs.adapter_folder(layout=layout, job=job)
    headers = {"Content-Disposition": f'attachment; filename="{job.id}.tar"'}
    tar = tar_stream(folder, job.id, replace=jobs.download_replacements(layout=layout, job=job))
    return StreamingResponse(tar, media_type="application/x-tar", headers=headers)


# -- live events ---------------------------------------------------------------------------------------
@router.get("/jobs/{job_id}/vllm", response_model=VllmServingPublic,
            responses={409: {"description": "the job has not completed: its adapter does not exist yet"}})
def vllm(job_id: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> VllmServingPublic:
    """The `vllm serve` command that serves the job's adapter on its base model, checked against what vLLM's LoRA
    loader requires (the config fields, the target modules, no modules_to_save, no DoRA)."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    jobs.adapter_folder(layout=layout, job=job)     # Conflict until it completed
    answer = serving.vllm_serving(session=session, caller=caller, layout=layout, job=job)
    return VllmServingPublic(model=answer.model, compatible=answer.compatible, problems=answer.problems,
                             command=answer.command)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
def events(job_id: str, request: Request, caller: CurrentCaller, session: SessionDep,
           since: int = Query(-1, ge=-1, le=2**62, description="Last event id already seen (or send Last-Event-ID).")
           ) -> StreamingResponse:
    """Server-Sent Events: every event of the job so far, then new ones as they come. Each engine event carries
    as `id` the byte offset in the events file where the next one starts; reconnecting with Last-Event-ID (or
    `?since=`) resumes after it. A comment line (`: keep-alive`) comes after 15 s without news. The stream holds no
    database connection: every stream of one job shares one poller (api/feeds.py)."""
    job = jobs.get_job(session=session, caller=caller, job_id=job_id)
    header = request.headers.get("last-event-id")
    start = int(header) if header and header.isdigit() and len(header) < 19 else since

    async def stream() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        async for key, event in follow_job(request.app, job.id, start):
            if key == "keepalive":
                yield ": keep-alive\n\n"
            elif key == "status":
                yield f"event: status\ndata: {event.model_dump_json()}\n\n"  # type: ignore[union-attr]
            else:
                yield f"id: {key}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"  # type: ignore[union-attr]

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.websocket("/jobs/{job_id}/ws")
async def websocket(websocket: WebSocket, job_id: str, since: int = -1) -> None:
    """The same feed as /events, one JSON message each: {"id": n, ...event} or {"type": "status", ...}."""
    def authorize(caller: Caller) -> Job:
        with websocket.app.state.db.session() as session:
            return jobs.get_job(session=session, caller=caller, job_id=job_id)

    try:
        job = await run_in_threadpool(authorize, await get_ws_caller(websocket))
    except (HTTPException, DomainError) as err:  # accept first: a close code (4401, 4404) only exists on an open socket
        code = err.status_code if isinstance(err, HTTPException) else 404 if isinstance(err, NotFound) else 400
        await websocket.accept()
        await websocket.close(code=4000 + code, reason=str(getattr(err, "detail", err)))
        return
    await websocket.accept()
    try:
        async for key, event in follow_job(websocket.app, job.id, since):
            if key == "keepalive":
                continue
            data = event.model_dump(mode="json")  # type: ignore[union-attr]
            await websocket.send_json({"type": "status", **data} if key == "status" else {"id": key, **data})
        await websocket.close()
    except WebSocketDisconnect:
        return
