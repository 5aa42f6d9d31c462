"""The GPU worker's work, without HTTP: accept a submit, fetch its dataset, run it as an engine job, answer status
and events, cancel, and pack the output folder.

The worker keeps its own store (its USF_HOME's database, never the control plane's): a ``WorkerSubmission`` per
submit, and — once the dataset is fetched and checked — an ordinary ``Job`` row with the same id, which the
scheduler runs on this host's GPUs with the local executor. So GPU allocation, the lifecycle, cancel with its
grace period and the recovery after a restart (live engines followed again, interrupted ones resumed from their
newest checkpoint) are the control plane's own.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from usf_bios.control import lifecycle
from usf_bios.control.db import Database, migrate
from usf_bios.control.errors import Busy, Conflict, Invalid, NotFound
from usf_bios.control.executors.local import LocalExecutor
from usf_bios.control.gpus import list_gpus
from usf_bios.control.lifecycle import InvalidTransition, JobStatus
from usf_bios.control.scheduler import Scheduler
from usf_bios.control.tables import Job, WorkerSubmission
from usf_bios.datasets.formats import DatasetError, load_dataset
from usf_bios.datasets.readers import SUPPORTED_SUFFIXES
from usf_bios.engine.events import read_events_at
from usf_bios.engine.jobdir import create_job, new_job_id
from usf_bios.engine.model import device_problems
from usf_bios.engine.reporters import ReporterError, check_reporters
from usf_bios.models.sources import ModelNotFound, resolve_model
from usf_bios.netguard import BlockedURL, fetch_to_file, resolve_checked
from usf_bios.settings import Settings
from usf_bios.spec import JobSpec, SpecError
from usf_bios.storage import StorageLayout, safe_filename
from usf_bios.worker.contract import (ArtifactInfo, EventsPage, RemoteJobStatus, RemoteMetrics, SequencedEvent,
                                      SubmitRequest, remote_status, submit_spec)

log = logging.getLogger("usf_bios.worker")
MAX_EVENTS_PAGE = 2000


def _now() -> datetime:
    return datetime.now(timezone.utc)


class WorkerService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.layout = StorageLayout.from_settings(settings)
        self.layout.ensure()
        migrate(settings.database_url or "")
        self.db = Database(settings.database_url or "")
        self.executor = LocalExecutor(self.layout, settings)
        self.scheduler = Scheduler(self.db, self.layout, settings, {"local": self.executor})
        self._fetchers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="usf-fetch")
        self._pack_lock = threading.Lock()

    @property
    def artifacts(self) -> Path:
        return self.layout.root / "data" / "artifacts"

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()
        with self.db.session() as session:   # fetches cut off by a restart start over
            for sub in session.scalars(select(WorkerSubmission).where(WorkerSubmission.state == "fetching")):
                self._fetchers.submit(self._fetch, sub.id)

    def stop(self) -> None:
        self._fetchers.shutdown(wait=False, cancel_futures=True)
        self.scheduler.stop()
        self.db.engine.dispose()

    # -- submit -------------------------------------------------------------------------------------
    def check(self, request: SubmitRequest) -> JobSpec:
        """The submit's spec, refused (Invalid naming the field) for what would fail here before any fetch."""
        try:
            spec = submit_spec(request)
        except SpecError as err:
            field, _, reason = err.problems[0].partition(": ")
            # the contract carries base_model inside hyperparameters
            raise Invalid("hyperparameters.base_model" if field == "base_model" else field, reason or err.problems[0]) from None
        if spec.trust_remote_code and not self.settings.worker_trust_remote_code:
            raise Invalid("trust_remote_code", "this worker does not run a model's own code "
                                               "(USF_WORKER_TRUST_REMOTE_CODE is off)")
        if problems := device_problems(spec):
            raise Invalid(*problems[0])
        gpus = self.executor.resources().gpus
        if spec.gpu_config.num_gpus > gpus:
            raise Invalid("gpu_config.num_gpus", f"the job asks for {spec.gpu_config.num_gpus} GPU(s); this worker "
                                                 f"has {gpus}" + ("; set num_gpus: 0 to train on its CPU" if not gpus else ""))
        try:
            resolve_model(spec.base_model, self.layout, self.settings.supported_model_sources)
        except ModelNotFound as err:
            raise Invalid("hyperparameters.base_model", f"not on this worker: {err}") from None
        self._check_url(request.dataset_url, "dataset_url")
        if request.callback_url:
            self._check_url(request.callback_url, "callback_url")
        try:
            check_reporters(spec)   # report_to: each tool's package installed and configured on this worker
        except ReporterError as err:
            raise Invalid("report_to", str(err).removeprefix("report_to: ")) from None
        return spec

    def _check_url(self, url: str, field: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise Invalid(field, f"only http and https URLs are taken, not {parts.scheme or 'a relative URL'!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            resolve_checked(parts.hostname or "", port, self.settings.worker_allowed_hosts)
        except (BlockedURL, ValueError) as err:
            raise Invalid(field, str(err)) from None

    def submit(self, request: SubmitRequest) -> str:
        """The external_job_id of the submit; the same job_id again returns the same one and starts no new job —
        one that failed or was cancelled continues (from its newest checkpoint), as a resume does."""
        with self.db.session() as session:
            existing = session.scalar(select(WorkerSubmission).where(WorkerSubmission.job_id == request.job_id))
            if existing is not None:
                self._continue(session, existing, request)
                return existing.id
        spec = self.check(request)
        sub = WorkerSubmission(id=new_job_id(spec.name), job_id=request.job_id, state="fetching",
                               spec=spec.model_dump(mode="json"), dataset_url=request.dataset_url,
                               callback_url=request.callback_url, callback_offset=0)
        with self.db.session() as session:
            session.add(sub)
            try:
                session.commit()
            except IntegrityError:   # the same job_id submitted at the same moment: one of them won
                session.rollback()
                return session.scalars(select(WorkerSubmission.id).where(WorkerSubmission.job_id == request.job_id)).one()
        log.info("accepted job %s as %s; fetching its dataset", request.job_id, sub.id)
        self._fetchers.submit(self._fetch, sub.id)
        return sub.id

    def _continue(self, session, sub: WorkerSubmission, request: SubmitRequest) -> None:  # noqa: ANN001
        """A submit again of a job that ended without completing: it goes on (a fetch again, or a resume) with the
        new submit's dataset_url and callback_url (a fresh signed URL; the old one may have expired), checked as a
        first submit's are."""
        job = session.get(Job, sub.id)
        if job is not None and job.status == JobStatus.CANCELLING.value:   # a resume sent while the cancel ends
            raise Busy(f"job {sub.id} is still stopping (saving its checkpoint after a cancel); submit it again "
                       "once its status is cancelled, and it continues from that checkpoint")
        restart = sub.state in ("failed", "cancelled") or (
            job is not None and job.status in (JobStatus.FAILED.value, JobStatus.CANCELLED.value))
        if restart:
            self._check_url(request.dataset_url, "dataset_url")
            if request.callback_url:
                self._check_url(request.callback_url, "callback_url")
            sub.dataset_url, sub.callback_url = request.dataset_url, request.callback_url
        if sub.state in ("failed", "cancelled"):
            sub.state, sub.error, sub.finished_at, sub.callback_status = "fetching", None, None, None
            session.commit()
            self._fetchers.submit(self._fetch, sub.id)
            return
        if restart and job is not None:
            def again(job: Job) -> None:
                lifecycle.requeue(job, reset_attempts=True)
                job.error = None
                sub.callback_status = None

            lifecycle.commit_change(session, job, again)
            log.info("job %s submitted again: it continues from its newest checkpoint", sub.id)
            self.scheduler.wake()

    def _fetch(self, external_id: str) -> None:
        """Fetch and check the dataset, then queue the job; a fault fails the submission with its reason."""
        try:
            with self.db.session() as session:
                sub = session.get(WorkerSubmission, external_id)
                if sub is None or sub.state != "fetching":
                    return
                url, spec = sub.dataset_url, JobSpec.model_validate(sub.spec)
            folder = self.layout.datasets / external_id
            shutil.rmtree(folder, ignore_errors=True)
            fetched = fetch_to_file(url, folder / "download", max_bytes=self.settings.max_upload_mb * 2**20,
                                    allowed_hosts=self.settings.worker_allowed_hosts)
            name = safe_filename(fetched.filename) or "dataset"
            if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
                name = "dataset" + _sniff_suffix(fetched.path)
            path = fetched.path.rename(folder / name)
            try:
                load_dataset(path, spec.dataset_format)
            except DatasetError as err:
                raise DatasetError(name, err.reason, err.line, unit=err.unit) from None
            model = resolve_model(spec.base_model, self.layout, self.settings.supported_model_sources)
            locked = spec.model_copy(update={"base_model": str(model.path), "dataset": str(path)})
            self._queue(external_id, spec, locked, fetched.sha256)
        except (BlockedURL, DatasetError, ModelNotFound, httpx.HTTPError, OSError) as err:
            reason = f"dataset_url: {err}" if isinstance(err, (BlockedURL, httpx.HTTPError)) else f"dataset: {err}"
            if isinstance(err, ModelNotFound):
                reason = f"hyperparameters.base_model: {err}"
            log.warning("job %s failed before it started: %s", external_id, reason)
            self._fail_submission(external_id, reason)
        except Exception as err:   # never lose a submission without a word
            log.exception("fetching the dataset of %s failed", external_id)
            self._fail_submission(external_id, f"{type(err).__name__}: {err}")

    def _queue(self, external_id: str, spec: JobSpec, locked: JobSpec, sha256: str) -> None:
        shutil.rmtree(self.layout.job_output(external_id), ignore_errors=True)   # a restart between the two steps
        create_job(locked, self.layout, job_id=external_id)
        with self.db.session() as session:
            sub = session.get(WorkerSubmission, external_id)
            if sub is None or sub.state != "fetching":   # cancelled meanwhile
                return
            session.add(Job(id=external_id, name=spec.name, status=JobStatus.QUEUED.value,
                            spec=locked.model_dump(mode="json"), request=spec.model_dump(mode="json"),
                            num_gpus=spec.gpu_config.num_gpus, max_attempts=self.settings.max_attempts,
                            executor="local", metrics={}))
            sub.state, sub.dataset_sha256 = "accepted", sha256
            session.commit()
        self.scheduler.wake()

    def _fail_submission(self, external_id: str, reason: str) -> None:
        with self.db.session() as session:
            sub = session.get(WorkerSubmission, external_id)
            if sub is not None and sub.state == "fetching":
                sub.state, sub.error, sub.finished_at = "failed", reason, _now()
                session.commit()

    # -- answers ------------------------------------------------------------------------------------
    def _get(self, session, external_id: str) -> WorkerSubmission:  # noqa: ANN001
        sub = session.get(WorkerSubmission, external_id) if "\x00" not in external_id else None
        if sub is None:
            raise NotFound("job", external_id)
        return sub

    def status(self, external_id: str) -> RemoteJobStatus:
        with self.db.session() as session:
            sub = self._get(session, external_id)
            job = session.get(Job, external_id) if sub.state == "accepted" else None
            base = {"external_job_id": sub.id, "job_id": sub.job_id}
            if job is None:
                status = {"fetching": "queued", "failed": "failed", "cancelled": "cancelled"}[sub.state]
                return RemoteJobStatus(**base, status=status, stage="fetching_dataset" if status == "queued" else None,
                                       error=sub.error, finished_at=sub.finished_at)
            metrics = job.metrics or {}
            answer = RemoteJobStatus(
                **base, status=remote_status(JobStatus(job.status)), progress=job.progress,
                current_epoch=job.current_epoch, current_step=job.current_step, total_steps=job.total_steps,
                stage=job.stage, error=job.error, started_at=job.started_at, finished_at=job.finished_at,
                metrics=RemoteMetrics(training_loss=metrics.get("loss"), validation_loss=metrics.get("validation_loss"),
                                      learning_rate=metrics.get("learning_rate"),
                                      throughput=metrics.get("tokens_per_second"),
                                      gpu_utilization=_utilization(job) if job.status == "running" else None))
        if answer.status == "completed":
            answer.artifact = self.pack(external_id)
        return answer

    def events(self, external_id: str, after: int) -> EventsPage:
        status = self.status(external_id)   # NotFound first
        pairs, end = read_events_at(self.layout.job_events(external_id), max(after, 0))
        if len(pairs) > MAX_EVENTS_PAGE:
            pairs, end = pairs[:MAX_EVENTS_PAGE], pairs[MAX_EVENTS_PAGE - 1][0]
        return EventsPage(events=[SequencedEvent(seq=seq, event=event.model_dump(mode="json")) for seq, event in pairs],
                          next=end if pairs else max(after, 0), status=status.status)

    def cancel(self, external_id: str) -> RemoteJobStatus:
        with self.db.session() as session:
            sub = self._get(session, external_id)
            if sub.state == "fetching":
                sub.state, sub.finished_at = "cancelled", _now()
                session.commit()
            elif sub.state == "accepted":
                job = session.get(Job, external_id)
                try:
                    lifecycle.commit_change(session, job, lifecycle.request_cancel)
                except InvalidTransition as err:
                    raise Conflict(str(err)) from None
                self.scheduler.wake()
        return self.status(external_id)

    def pack(self, external_id: str) -> ArtifactInfo:
        """The output folder of a completed job as one tar (made once; its sha256 recorded)."""
        with self._pack_lock:
            with self.db.session() as session:
                sub = self._get(session, external_id)
                if sub.artifact_sha256 and self.artifact_path(external_id).is_file():
                    return ArtifactInfo(size_bytes=sub.artifact_size or 0, sha256=sub.artifact_sha256)
            folder = self.layout.job_output(external_id)
            target = self.artifact_path(external_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            with tarfile.open(partial, "w") as tar:
                for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                    tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
            digest = hashlib.sha256()
            with partial.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            partial.replace(target)
            with self.db.session() as session:
                sub = self._get(session, external_id)
                sub.artifact_sha256, sub.artifact_size = digest.hexdigest(), target.stat().st_size
                session.commit()
                return ArtifactInfo(size_bytes=sub.artifact_size, sha256=sub.artifact_sha256)

    def artifact_path(self, external_id: str) -> Path:
        from usf_bios.storage import confine

        return confine(self.artifacts, f"{external_id}.tar")

    def gpus(self) -> int:
        return self.executor.resources().gpus


def worker_settings() -> Settings:
    """The worker's settings; ``MODEL_PATH`` (the RunPod template's name for the network volume's model folder)
    stands for USF_MODEL_PATH when that is unset."""
    import os

    if os.environ.get("MODEL_PATH") and not os.environ.get("USF_MODEL_PATH"):
        os.environ["USF_MODEL_PATH"] = os.environ["MODEL_PATH"]
    return Settings()


def _sniff_suffix(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return ".json" if head.startswith(b"[") else ".jsonl" if head.startswith(b"{") else ".csv"


def _utilization(job: Job) -> float | None:
    wanted = {int(i) for i in (job.gpu_ids or "").split(",") if i.strip().isdigit()}
    values = [gpu.utilization_percent for gpu in list_gpus() if gpu.index in wanted]
    return round(sum(values) / len(values), 1) if values else None
