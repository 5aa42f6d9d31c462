"""What a remote GPU worker calls on the control plane: the signed dataset URL (no API key: the signature is the
credential, for that file until it expires) and the training callbacks (signed with USF_CALLBACK_SECRET)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from usf_bios.api.deps import LayoutDep, SessionDep, SettingsDep
from usf_bios.control import remote

router = APIRouter(tags=["remote worker"])


@router.get("/datasets/{dataset_id}/blob", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                       401: {"description": "bad or expired signature"}})
def dataset_blob(dataset_id: str, session: SessionDep, layout: LayoutDep, settings: SettingsDep,
                 expires: Annotated[str | None, Query()] = None, sig: Annotated[str | None, Query()] = None) -> FileResponse:
    """The dataset's file for a worker, through a signed, expiring URL (no API key)."""
    try:
        path, filename = remote.signed_dataset_file(session=session, layout=layout, settings=settings,
                                                    dataset_id=dataset_id, expires=expires, sig=sig)
    except remote.BadSignature as err:
        raise HTTPException(401, str(err)) from None
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.put("/jobs/{job_id}/artifact", status_code=201,
            responses={401: {"description": "bad or expired signature"}, 413: {"description": "over USF_MAX_ARTIFACT_MB"},
                       422: {"description": "the body's sha256 is not X-Artifact-Sha256"}})
async def upload_artifact(job_id: str, request: Request, session: SessionDep, layout: LayoutDep, settings: SettingsDep,
                          expires: Annotated[str | None, Query()] = None, sig: Annotated[str | None, Query()] = None,
                          x_artifact_sha256: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """A RunPod handler's artifact (the tar of the job's output folder), through the signed upload URL the job was
    submitted with; kept until the remote executor unpacks it."""
    import hashlib

    from usf_bios.control.executors.transports import uploaded_artifact

    try:
        await run_in_threadpool(lambda: remote.check_upload_url(session=session, settings=settings, job_id=job_id,
                                                                expires=expires, sig=sig))
    except remote.BadSignature as err:
        raise HTTPException(401, str(err)) from None
    target = uploaded_artifact(layout.output, job_id)
    partial = target.with_suffix(".part")
    digest, size, cap = hashlib.sha256(), 0, settings.max_artifact_mb * 2**20
    try:
        with partial.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise HTTPException(413, f"the artifact is over USF_MAX_ARTIFACT_MB ({settings.max_artifact_mb} MB)")
                digest.update(chunk)
                out.write(chunk)
        if x_artifact_sha256 and digest.hexdigest() != x_artifact_sha256:
            raise HTTPException(422, f"the body's sha256 {digest.hexdigest()} is not X-Artifact-Sha256 {x_artifact_sha256}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    request.app.state.scheduler.wake()
    return {"size_bytes": size, "sha256": digest.hexdigest()}


@router.post("/callbacks/training", responses={401: {"description": "bad or stale signature"}})
async def training_callback(request: Request, session: SessionDep, settings: SettingsDep,
                            x_usf_signature: Annotated[str | None, Header()] = None,
                            x_usf_event_id: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """A worker's status, metrics or completion callback: applied once per event id."""
    raw = await request.body()
    try:
        body, new = await run_in_threadpool(lambda: remote.accept_callback(
            session=session, settings=settings, signature=x_usf_signature, event_id=x_usf_event_id, raw=raw))
    except remote.BadSignature as err:
        raise HTTPException(401, str(err)) from None
    except ValueError as err:
        raise HTTPException(422, f"not a callback body: {err}") from None
    scheduler = request.app.state.scheduler
    executor = scheduler.executors.get("remote")
    if new and executor is not None:
        await run_in_threadpool(executor.receive, body.status.job_id, body)
        scheduler.wake()
    return {"accepted": new}
