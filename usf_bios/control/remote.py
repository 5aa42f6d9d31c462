"""The control plane's side of the worker contract that needs no executor: the signed dataset URL's check and the
worker's callbacks (signature, time window, de-duplication, then handed to the remote executor)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usf_bios.control.errors import Forbidden, NotFound
from usf_bios.control.executors.remote import signing_secret
from usf_bios.control.tables import CallbackReceipt, DatasetEntry, Job
from usf_bios.settings import Settings
from usf_bios.signing import verify_callback, verify_url_path
from usf_bios.storage import StorageLayout, confine
from usf_bios.worker.contract import CallbackBody


class BadSignature(Forbidden):
    """A signed URL or a callback whose signature does not hold (answered 401)."""


def signed_dataset_file(*, session: Session, layout: StorageLayout, settings: Settings, dataset_id: str,
                        expires: str | None, sig: str | None) -> tuple[Path, str]:
    """The dataset file a signed URL opens, and its name; BadSignature when it is altered or expired."""
    problem = verify_url_path(signing_secret(settings), f"/api/datasets/{dataset_id}/blob", expires, sig)
    if problem:
        raise BadSignature(problem)
    entry = session.get(DatasetEntry, dataset_id)
    if entry is None:
        raise NotFound("dataset", dataset_id)
    path = confine(layout.datasets, Path(entry.path).resolve().relative_to(layout.datasets.resolve()))
    return path, entry.filename


def check_upload_url(*, session: Session, settings: Settings, job_id: str, expires: str | None,
                     sig: str | None) -> Job:
    """The remote job a signed artifact upload URL opens; BadSignature when altered or expired."""
    problem = verify_url_path(signing_secret(settings), f"/api/jobs/{job_id}/artifact", expires, sig)
    if problem:
        raise BadSignature(problem)
    job = session.get(Job, job_id)
    if job is None or job.executor != "remote":
        raise NotFound("remote job", job_id)
    return job


def accept_callback(*, session: Session, settings: Settings, signature: str | None, event_id: str | None,
                    raw: bytes) -> tuple[CallbackBody, bool]:
    """The callback's body and whether it is new (a replayed event id is not); BadSignature for a wrong or stale
    signature, or when this server has no USF_CALLBACK_SECRET."""
    if not settings.callback_secret:
        raise BadSignature("this server takes no callbacks (USF_CALLBACK_SECRET is unset)")
    problem = verify_callback(settings.callback_secret, signature, raw)
    if problem:
        raise BadSignature(problem)
    body = CallbackBody.model_validate_json(raw)
    if not event_id or event_id != body.event_id:
        raise BadSignature("X-USF-Event-Id is missing or is not the body's event_id")
    job = session.get(Job, body.status.job_id)
    if job is None or job.executor != "remote":
        raise NotFound("remote job", body.status.job_id)
    session.add(CallbackReceipt(event_id=event_id, job_id=job.id))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return body, False
    return body, True
