"""Datasets: streamed upload with validation, list, detail with token statistics, preview, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep, SettingsDep
from usf_bios.api.uploads import UploadRejected, receive_multipart
from usf_bios.control import datasets
from usf_bios.control.schemas import DatasetDetail, DatasetPublic, PreviewExample

router = APIRouter(tags=["datasets"])


@router.post("/datasets", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic,
             responses={413: {"description": "over USF_MAX_UPLOAD_MB"}, 415: {"description": "not a dataset file"},
                        409: {"description": "name taken"}, 422: {"description": "invalid dataset (file:line: reason)"}})
async def upload(request: Request, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
                 settings: SettingsDep) -> DatasetPublic:
    """multipart/form-data: ``file`` (.jsonl, .json, .csv), optional ``name`` and ``format``. Streamed to disk."""
    try:
        received = await receive_multipart(request, layout.uploads, settings.max_upload_mb * 2**20,
                                           check_filename=datasets.check_upload_filename)
    except UploadRejected as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    row = await run_in_threadpool(lambda: datasets.register_dataset(session=session, caller=caller, layout=layout,
                                                                    upload=received))
    return DatasetPublic.model_validate(row)


@router.get("/datasets", response_model=list[DatasetPublic])
def list_datasets(caller: CurrentCaller, session: SessionDep) -> list[DatasetPublic]:
    return datasets.list_datasets(session=session, caller=caller)


@router.get("/datasets/{ref}", response_model=DatasetDetail)
def get_dataset(ref: str, caller: CurrentCaller, session: SessionDep,
                model: Annotated[str | None, Query(description="registered model id or name for token stats")] = None,
                max_seq_length: Annotated[int, Query(ge=1, le=1 << 20)] = 2048) -> DatasetDetail:
    entry = datasets.get_dataset(session=session, caller=caller, ref=ref)
    return datasets.dataset_detail(session=session, caller=caller, entry=entry, model_ref=model,
                                   max_seq_length=max_seq_length)


@router.get("/datasets/{ref}/preview", response_model=list[PreviewExample])
def preview(ref: str, caller: CurrentCaller, session: SessionDep,
            limit: Annotated[int, Query(ge=1, le=100)] = 5) -> list[PreviewExample]:
    return datasets.preview_examples(entry=datasets.get_dataset(session=session, caller=caller, ref=ref), limit=limit)


@router.delete("/datasets/{ref}", status_code=status.HTTP_204_NO_CONTENT)
def delete(ref: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> None:
    datasets.delete_dataset(session=session, layout=layout,
                            entry=datasets.get_dataset(session=session, caller=caller, ref=ref))
