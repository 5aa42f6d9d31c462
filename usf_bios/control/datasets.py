"""Datasets: register a streamed upload after validating it, list, token statistics, preview, delete.

No HTTP here: failures are domain errors (``control/errors.py``) or the parser's ``DatasetError`` (file, line,
reason), which ``api/main.py`` turns into answers.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usf_bios.control.errors import Conflict, Invalid, Unsupported
from usf_bios.control.keys import Caller, find_owned, get_owned, name_taken
from usf_bios.control.schemas import (DatasetDetail, DatasetPublic, LengthBucket, ModelRef, PreviewExample,
                                     PreviewMessage, TokenStatsPublic)
from usf_bios.control.tables import DatasetEntry, Job, ModelEntry, new_id
from usf_bios.control.token_lengths import TokenLengthsError, template_system_prompt_for, token_lengths_for
from usf_bios.datasets.formats import FORMATS, DatasetError, load_dataset, to_example
from usf_bios.datasets.readers import SUPPORTED_SUFFIXES, read_records
from usf_bios.storage import StorageLayout, confine, safe_filename

HISTOGRAM_BINS = 20
ORPHAN_UPLOAD_AGE_S = 3600   # a file in the uploads folder untouched this long belongs to no live upload
log = logging.getLogger(__name__)
_NAME = re.compile(r"^[\w-][\w. -]{0,199}$")


@dataclass
class ReceivedUpload:
    """A file streamed to disk by the API (``api/uploads.py``) and not yet validated."""

    path: Path                   # the streamed file part, ``<uploads>/<uuid>.part``
    filename: str                # as the client sent it: untrusted
    size: int
    fields: dict[str, str] = field(default_factory=dict)


def find_dataset(session: Session, caller: Caller, ref: str) -> DatasetEntry | None:
    """A registered dataset by id or name, scoped to the caller; None when the caller cannot see one."""
    return find_owned(session, caller, DatasetEntry, ref)


def get_dataset(*, session: Session, caller: Caller, ref: str) -> DatasetEntry:
    return get_owned(session, caller, DatasetEntry, ref, "dataset")


# --- upload -------------------------------------------------------------------------------------------------

def sweep_orphan_uploads(layout: StorageLayout, older_than_s: float = ORPHAN_UPLOAD_AGE_S) -> int:
    """Remove what a killed server left in the uploads folder (``<uuid>.part`` files and their staged copies),
    and return how many files went. Only files not written for ``older_than_s``: a live upload writes its part
    file as the body arrives and validates it within minutes, and another server sharing USF_HOME may be
    receiving one right now."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in layout.uploads.iterdir() if layout.uploads.is_dir() else ():
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:   # gone meanwhile (another server swept it), or not ours to remove
            continue
    if removed:
        log.warning("removed %d orphan upload file(s) older than %.0f s from %s", removed, older_than_s, layout.uploads)
    return removed


def check_upload_filename(raw: str) -> str:
    """The safe stored name of an uploaded file; Unsupported unless its suffix is a supported dataset type."""
    name = safe_filename(raw)
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES or not Path(name).stem:
        shown = f"'{suffix}'" if suffix else "(no suffix)"
        raise Unsupported(f"unsupported file type {shown} for {raw!r}; upload one of: {', '.join(SUPPORTED_SUFFIXES)}")
    return name


def _form_choices(fields: dict[str, str], filename: str) -> tuple[str, str]:
    """(name, format) from the form: the name defaults to the file's stem, the format to auto."""
    fmt = (fields.get("format") or "auto").strip()
    if fmt not in ("auto", *FORMATS):
        raise Invalid("format", f"{fmt!r} is not one of: auto, {', '.join(FORMATS)}")
    name = (fields.get("name") or "").strip() or Path(filename).stem
    if not _NAME.match(name) or not name.strip("."):
        raise Invalid("name", f"{name!r} must be 1-200 letters, digits, '_', '-', '.' or spaces")
    return name, fmt


def register_dataset(*, session: Session, caller: Caller, layout: StorageLayout, upload: ReceivedUpload) -> DatasetEntry:
    """Validate the streamed file and register it; on any failure nothing stays on disk or in the table.

    Raises DatasetError (located by the uploaded file's name, not the temporary path) or a domain error.
    """
    staged = upload.path
    folder: Path | None = None
    try:
        filename = check_upload_filename(upload.filename)
        staged = upload.path.with_name(upload.path.stem + Path(filename).suffix.lower())  # readers go by suffix
        upload.path.rename(staged)
        name, fmt = _form_choices(upload.fields, filename)
        if name_taken(session, DatasetEntry, caller.owner, name):
            raise Conflict(f"a dataset named {name!r} already exists; choose another name")
        try:
            loaded = load_dataset(staged, fmt)  # type: ignore[arg-type]
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
            raise Conflict("a dataset with that name already exists") from None
        raise
    finally:
        upload.path.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)


# --- list, detail, preview, delete ----------------------------------------------------------------------------

def list_datasets(*, session: Session, caller: Caller) -> list[DatasetPublic]:
    query = caller.scope(select(DatasetEntry), DatasetEntry.owner_key_id)
    return [DatasetPublic.model_validate(r) for r in session.scalars(query.order_by(DatasetEntry.created_at.desc()))]


def _stats_model(session: Session, caller: Caller, ref: str | None) -> ModelEntry | None:
    """The named model (NotFound when the caller has none by that id/name), else the newest valid one, else None."""
    if ref is None:
        query = caller.scope(select(ModelEntry).where(ModelEntry.valid.is_(True)), ModelEntry.owner_key_id)
        return session.scalars(query.order_by(ModelEntry.created_at.desc()).limit(1)).first()
    return get_owned(session, caller, ModelEntry, ref, "model")


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[LengthBucket]:
    """Equal-width integer buckets [start, end) from the shortest to the longest length, at most ``bins``."""
    low, span = min(lengths), max(lengths) - min(lengths) + 1
    width = math.ceil(span / bins)
    counts = [0] * math.ceil(span / width)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [LengthBucket(start=low + i * width, end=low + (i + 1) * width, count=c) for i, c in enumerate(counts)]


def dataset_detail(*, session: Session, caller: Caller, entry: DatasetEntry, model_ref: str | None,
                   max_seq_length: int) -> DatasetDetail:
    """The dataset plus token stats at ``max_seq_length`` and a length histogram under the model's tokenizer. The
    lengths are cached per (file, model) (control/token_lengths.py), so a new max_seq_length (the dashboard's
    truncation slider) costs no tokenization. An explicit model that cannot tokenize the dataset is Invalid; the
    default one gives a note."""
    from usf_bios.datasets.stats import stats_from_lengths

    detail = DatasetDetail.model_validate(entry)
    model = _stats_model(session, caller, model_ref)
    if model is None:
        return detail
    detail.token_stats_model = ModelRef.model_validate(model)
    try:
        lengths = sorted(token_lengths_for(entry, model, entry.format))
    except TokenLengthsError as exc:   # no tokenizer files, no chat template, unreadable file
        if model_ref is not None:
            raise Invalid("model", f"cannot compute token stats: {exc.reason}") from None
        detail.token_stats_error = f"cannot compute token stats: {exc.reason}"
        return detail
    detail.token_stats = TokenStatsPublic.model_validate(stats_from_lengths(lengths, max_seq_length))
    detail.length_histogram = length_histogram(lengths)
    detail.template_system_prompt = template_system_prompt_for(model)
    return detail


def preview_examples(*, entry: DatasetEntry, limit: int) -> list[PreviewExample]:
    """The first ``limit`` examples as conversations, read lazily (JSONL and CSV stop early)."""
    out: list[PreviewExample] = []
    try:
        for line, record in read_records(Path(entry.path)):
            example = to_example(record, entry.format, line)
            out.append(PreviewExample(line=line, messages=[PreviewMessage(role=m.role, content=m.content)
                                                           for m in example.messages], templated=example.templated))
            if len(out) >= limit:
                break
    except (DatasetError, ValueError) as exc:   # the file changed on disk after it was registered
        raise Conflict(f"the stored dataset cannot be read: {exc}") from None
    return out


def delete_dataset(*, session: Session, layout: StorageLayout, entry: DatasetEntry) -> None:
    """Remove the row and its folder; Conflict while a job refers to it."""
    jobs = list(session.scalars(select(Job.id).where(Job.dataset_id == entry.id).limit(6)))
    if len(jobs) < 6:   # a mixture's other datasets are in the locked spec only
        jobs += [job_id for job_id, spec in session.execute(select(Job.id, Job.spec).where(Job.dataset_id != entry.id))
                 if any(isinstance(d, dict) and d.get("name") == entry.path for d in (spec or {}).get("datasets") or [])]
    if jobs:
        shown = ", ".join(jobs[:5]) + (", …" if len(jobs) > 5 else "")
        raise Conflict(f"dataset {entry.name!r} is used by job(s) {shown}; delete those jobs first")
    folder = confine(layout.datasets, entry.id)
    session.delete(entry)
    session.commit()
    if folder != layout.datasets.resolve():
        shutil.rmtree(folder, ignore_errors=True)
