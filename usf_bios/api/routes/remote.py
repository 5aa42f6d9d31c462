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
            responses={200: {"content": {"application/octet-stream": {}}}, 401: {"description": "bad or expired signature"}})
def dataset_blob(dataset_id: str, session: SessionDep, layout: LayoutDep, settings: SettingsDep,
                 expires: Annotated[str | None, Query()] = None, sig: Annotated[str | None, Query()] = None) -> FileResponse:
    """The dataset's file for a worker, through a signed, expiring URL (no API key)."""
    try:
        path, filename = remote.signed_dataset_file(session=session, layout=layout, settings=settings,
                                                    dataset_id=dataset_id, expires=expires, sig=sig)
    except remote.BadSignature as err:
        raise HTTPException(401, str(err)) from None
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


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
