"""Datasets: streamed upload with validation, list, detail with token statistics, preview, delete."""

from __future__ import annotations

import math
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from usf_bios.api.deps import Caller, CurrentCaller, LayoutDep, SessionDep, SettingsDep, find_owned, owned_or_404
from usf_bios.api.uploads import ReceivedUpload, UploadRejected, receive_multipart, safe_filename
from usf_bios.control.tables import DatasetEntry, Job, ModelEntry, new_id
from usf_bios.control.token_lengths import TokenLengthsError, token_lengths_for
from usf_bios.datasets.formats import FORMATS, DatasetError, load_dataset, to_example
from usf_bios.datasets.readers import SUPPORTED_SUFFIXES, read_records
from usf_bios.storage import StorageLayout, confine

router = APIRouter(tags=["datasets"])

HISTOGRAM_BINS = 20
_NAME = re.compile(r"^[\w-][\w. -]{0,199}$")


class DatasetPublic(BaseModel):
    id: str
    name: str
    filename: str
    format: str
    rows: int
    size_bytes: int
    sha256: str
    created_at: datetime


class TokenStatsPublic(BaseModel):
    min: int
    mean: float
    p95: int
    max: int
    truncated: int
    max_seq_length: int


class LengthBucket(BaseModel):
    start: int   # inclusive
    end: int     # exclusive
    count: int


class ModelRef(BaseModel):
    id: str
    name: str


class DatasetDetail(DatasetPublic):
    token_stats: TokenStatsPublic | None = None
    token_stats_model: ModelRef | None = None
    token_stats_error: str | None = None
    length_histogram: list[LengthBucket] | None = None


class PreviewMessage(BaseModel):
    role: str
    content: str


class PreviewExample(BaseModel):
    line: int
    messages: list[PreviewMessage]


def dataset_public(row: DatasetEntry) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "filename": row.filename, "format": row.format, "rows": row.rows,
            "size_bytes": row.size_bytes, "sha256": row.sha256, "created_at": row.created_at}


def find_dataset(session: Session, caller: Caller, ref: str) -> DatasetEntry | None:
    """A registered dataset by id or name, scoped to the caller; None when the caller cannot see one."""
    return find_owned(session, caller, DatasetEntry, ref)


def _get_dataset(session: Session, caller: Caller, ref: str) -> DatasetEntry:
    return owned_or_404(session, caller, DatasetEntry, ref, "dataset")


# --- upload -------------------------------------------------------------------------------------------------

def check_upload_filename(raw: str) -> str:
    """The safe stored name of an uploaded file; 415 unless its suffix is a supported dataset type."""
    name = safe_filename(raw)
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES or not Path(name).stem:
        shown = f"'{suffix}'" if suffix else "(no suffix)"
        raise UploadRejected(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                             f"unsupported file type {shown} for {raw!r}; upload one of: {', '.join(SUPPORTED_SUFFIXES)}")
    return name


def _form_choices(fields: dict[str, str], filename: str) -> tuple[str, str]:
    """(name, format) from the form: the name defaults to the file's stem, the format to auto."""
    fmt = (fields.get("format") or "auto").strip()
    if fmt not in ("auto", *FORMATS):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"format: {fmt!r} is not one of: auto, {', '.join(FORMATS)}")
    name = (fields.get("name") or "").strip() or Path(filename).stem
    if not _NAME.match(name) or not name.strip("."):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"name: {name!r} must be 1-200 letters, digits, '_', '-', '.' or spaces")
    return name, fmt


def _check_name_free(session: Session, owner: str | None, name: str) -> None:
    owner_match = DatasetEntry.owner_key_id.is_(None) if owner is None else DatasetEntry.owner_key_id == owner
    if session.scalar(select(DatasetEntry.id).where(owner_match, DatasetEntry.name == name)) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"a dataset named {name!r} already exists; choose another name")


def register_upload(session: Session, caller: Caller, layout: StorageLayout, upload: ReceivedUpload) -> DatasetEntry:
    """Validate the streamed file and register it; on any failure nothing stays on disk or in the table.

    Raises DatasetError (located by the uploaded file's name, not the temporary path) or HTTPException.
    """
    staged = upload.path
    folder: Path | None = None
    try:
        filename = check_upload_filename(upload.filename)
        staged = upload.path.with_name(upload.path.stem + Path(filename).suffix.lower())  # readers go by suffix
        upload.path.rename(staged)
        name, fmt = _form_choices(upload.fields, filename)
        _check_name_free(session, caller.owner, name)
        try:
            loaded = load_dataset(staged, fmt)
        except DatasetError as exc:
            raise DatasetError(filename, exc.reason, exc.line, unit=exc.unit) from None
        dataset_id = new_id()
        folder = confine(layout.datasets, dataset_id)
        folder.mkdir(parents=True)
        final = confine(folder, filename)
        staged.rename(final)
        row = DatasetEntry(id=dataset_id, name=name, filename=filename, path=str(final), format=loaded.format,
                           rows=len(loaded.examples), size_bytes=final.stat().st_size, sha256=loaded.sha256,
                           owner_key_id=caller.owner)
        session.add(row)
        session.commit()
        return row
    except BaseException as exc:  # noqa: BLE001 - cleaned up, then re-raised
        session.rollback()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, IntegrityError):
            raise HTTPException(status.HTTP_409_CONFLICT, "a dataset with that name already exists") from None
        raise
    finally:
        upload.path.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)


def invalid_dataset(exc: DatasetError) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "file": exc.file, "line": exc.line, "unit": exc.unit, "reason": exc.reason},
                        status_code=status.HTTP_422_UNPROCESSABLE_ENTITY)


@router.post("/datasets", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic,
             responses={413: {"description": "over USF_MAX_UPLOAD_MB"}, 415: {"description": "not a dataset file"},
                        409: {"description": "name taken"}, 422: {"description": "invalid dataset (file:line: reason)"}})
async def upload(request: Request, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
                 settings: SettingsDep) -> Any:
    """multipart/form-data: ``file`` (.jsonl, .json, .csv), optional ``name`` and ``format``. Streamed to disk."""
    try:
        received = await receive_multipart(request, layout.uploads, settings.max_upload_mb * 2**20,
                                           check_filename=check_upload_filename)
        row = await run_in_threadpool(register_upload, session, caller, layout, received)
    except UploadRejected as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    except DatasetError as exc:
        return invalid_dataset(exc)
    return dataset_public(row)


# --- list, detail, preview, delete ----------------------------------------------------------------------------

@router.get("/datasets", response_model=list[DatasetPublic])
def list_datasets(caller: CurrentCaller, session: SessionDep) -> list[dict]:
    query = caller.scope(select(DatasetEntry), DatasetEntry.owner_key_id)
    return [dataset_public(r) for r in session.scalars(query.order_by(DatasetEntry.created_at.desc()))]


def _stats_model(session: Session, caller: Caller, ref: str | None) -> ModelEntry | None:
    """The named model (404 when the caller has none by that id/name), else the newest valid one, else None."""
    if ref is None:
        query = caller.scope(select(ModelEntry).where(ModelEntry.valid.is_(True)), ModelEntry.owner_key_id)
        return session.scalars(query.order_by(ModelEntry.created_at.desc()).limit(1)).first()
    return owned_or_404(session, caller, ModelEntry, ref, "model")


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict[str, int]]:
    """Equal-width integer buckets [start, end) from the shortest to the longest length, at most ``bins``."""
    low, span = min(lengths), max(lengths) - min(lengths) + 1
    width = math.ceil(span / bins)
    counts = [0] * math.ceil(span / width)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [{"start": low + i * width, "end": low + (i + 1) * width, "count": c} for i, c in enumerate(counts)]


def compute_token_stats(entry: DatasetEntry, model: ModelEntry, max_seq_length: int) -> dict[str, Any]:
    """Token stats at ``max_seq_length`` and a length histogram under the model's tokenizer. The lengths are
    cached per (file, model) (control/token_lengths.py), so a new max_seq_length (the dashboard's truncation
    slider) costs no tokenization. Raises TokenLengthsError."""
    from usf_bios.datasets.stats import stats_from_lengths

    lengths = sorted(token_lengths_for(entry, model, entry.format))
    stats = stats_from_lengths(lengths, max_seq_length)
    return {"token_stats": {k: getattr(stats, k) for k in TokenStatsPublic.model_fields},
            "length_histogram": length_histogram(lengths)}


def dataset_detail(session: Session, caller: Caller, entry: DatasetEntry, model_ref: str | None,
                   max_seq_length: int) -> dict[str, Any]:
    """The dataset plus token stats; an explicit model that cannot tokenize it is a 422, the default one a note."""
    detail = dataset_public(entry)
    model = _stats_model(session, caller, model_ref)
    if model is None:
        return detail
    detail["token_stats_model"] = {"id": model.id, "name": model.name}
    try:
        detail.update(compute_token_stats(entry, model, max_seq_length))
    except TokenLengthsError as exc:   # no tokenizer files, no chat template, unreadable file
        message = f"cannot compute token stats: {exc.message}"
        if model_ref is not None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, message) from None
        detail["token_stats_error"] = message
    return detail


@router.get("/datasets/{ref}", response_model=DatasetDetail)
def get_dataset(ref: str, caller: CurrentCaller, session: SessionDep,
                model: Annotated[str | None, Query(description="registered model id or name for token stats")] = None,
                max_seq_length: Annotated[int, Query(ge=1, le=1 << 20)] = 2048) -> dict:
    return dataset_detail(session, caller, _get_dataset(session, caller, ref), model, max_seq_length)


def preview_examples(entry: DatasetEntry, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` examples as conversations, read lazily (JSONL and CSV stop early)."""
    out: list[dict[str, Any]] = []
    try:
        for line, record in read_records(Path(entry.path)):
            example = to_example(record, entry.format, line)
            out.append({"line": line, "messages": [{"role": m.role, "content": m.content} for m in example.messages]})
            if len(out) >= limit:
                break
    except (DatasetError, ValueError) as exc:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, f"the stored dataset cannot be read: {exc}") from None
    return out


@router.get("/datasets/{ref}/preview", response_model=list[PreviewExample])
def preview(ref: str, caller: CurrentCaller, session: SessionDep,
            limit: Annotated[int, Query(ge=1, le=100)] = 5) -> list[dict]:
    return preview_examples(_get_dataset(session, caller, ref), limit)


def delete_dataset(session: Session, layout: StorageLayout, entry: DatasetEntry) -> None:
    """Remove the row and its folder; 409 while a job refers to it."""
    jobs = list(session.scalars(select(Job.id).where(Job.dataset_id == entry.id).limit(6)))
    if jobs:
        shown = ", ".join(jobs[:5]) + (", …" if len(jobs) > 5 else "")
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"dataset {entry.name!r} is used by job(s) {shown}; delete those jobs first")
    folder = confine(layout.datasets, entry.id)
    session.delete(entry)
    session.commit()
    if folder != layout.datasets.resolve():
        shutil.rmtree(folder, ignore_errors=True)


@router.delete("/datasets/{ref}", status_code=status.HTTP_204_NO_CONTENT)
def delete(ref: str, caller: CurrentCaller, session: SessionDep, layout: LayoutDep) -> None:
    delete_dataset(session, layout, _get_dataset(session, caller, ref))
