"""Remote executor: jobs run on a GPU worker (`usf-bios worker`, the /training/* contract) or a RunPod serverless
endpoint, neither sharing a disk with this server (control/executors/transports.py speaks to each).

``start`` offers the job's dataset at a signed, expiring URL of this server and submits the job (a worker is
idempotent on the job id, so a second start after an interruption finds the same remote job). The remote side's
typed events are mirrored into the job's own events file here — from its callbacks as they arrive (``receive``)
and from polling every USF_REMOTE_POLL_S as the fallback — so the follower, the live chart, SSE, compare and the
training log read remote jobs exactly as local ones. Before the ``done`` event of a completed job is mirrored, the
artifact (a tar of the remote output folder) is brought into ``data/output/{job_id}/`` and its sha256 checked. A
remote side that does not answer for USF_REMOTE_TIMEOUT_S makes the job's poll report it gone: the scheduler
then marks it interrupted and starts it again (up to USF_MAX_ATTEMPTS), which submits it again.

The handle of a remote job is its job id here; what the executor knows of it (the external_job_id and how far
its events were mirrored) is kept in ``logs/{job_id}.remote.json``, so a restarted server continues.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from usf_bios.control.executors.base import Progress, Resources
from usf_bios.control.executors.transports import (RemoteRefused, RunPodTransport, Snapshot, Transport,
                                                   WorkerTransport, is_runpod_url)
from usf_bios.engine.events import DoneEvent, read_events
from usf_bios.engine.jobdir import locked_spec
from usf_bios.settings import Settings
from usf_bios.signing import sign_url_path, stored_secret
from usf_bios.status import JobStatus
from usf_bios.storage import StorageLayout, confine
from usf_bios.worker.contract import CallbackBody, RemoteJobStatus, SequencedEvent, submit_payload

log = logging.getLogger("usf_bios.remote")
ALIVE = ("queued", "running")
ARTIFACT_SKIP = {"job.yaml"}   # this server's locked spec stays; the remote one names the remote paths


def signing_secret(settings: Settings) -> str:
    return settings.signing_secret or stored_secret(settings.usf_home / "secrets" / "url-signing.key")


def public_url(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def signed_url(settings: Settings, path: str, now: float | None = None) -> str:
    """``{public}{path}?expires=…&sig=…``: that one path, without a key, until it expires."""
    expires = int((time.time() if now is None else now) + settings.signed_url_ttl_s)
    return f"{public_url(settings)}{path}?expires={expires}&sig={sign_url_path(signing_secret(settings), path, expires)}"


def portable_model_name(path: Path, layout: StorageLayout) -> str:
    """The base model as a worker with its own disks finds it: ``org--name`` for a folder of USF_MODEL_PATH,
    ``org/name`` for a Hugging Face cache snapshot, else the path itself (a volume both hosts mount)."""
    resolved = path.resolve()
    hub = layout.hf_hub_cache.resolve()
    for root in (layout.models.resolve(), hub):
        if resolved.is_relative_to(root) and resolved != root:
            first = resolved.relative_to(root).parts[0]
            return first.removeprefix("models--").replace("--", "/", 1) if root == hub else first
    return str(path)


@dataclass
class RemoteJob:
    """What this server knows of one remote job (the first three kept in its sidecar file)."""

    external_id: str | None = None
    cursor: int = 0               # the remote sequence number mirrored so far
    done: bool = False            # a done event has been mirrored
    reported: RemoteJobStatus | None = None   # what the remote side last said
    last_poll: float = 0.0
    last_answer: float = field(default_factory=time.monotonic)
    nudged: bool = True
    cancel_sent: int = 0          # 1: cancel sent; 2: sent again once the grace period ran out
    submitted: bool = True        # this attempt's submit was taken (until then each poll submits again)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RemoteExecutor:
    name = "remote"

    def __init__(self, layout: StorageLayout, settings: Settings, transport: Transport | None = None):
        if not settings.gpu_cluster_api_url or not settings.gpu_cluster_api_key:
            raise ValueError("the remote executor needs GPU_CLUSTER_API_URL and GPU_CLUSTER_API_KEY")
        self.layout, self.settings = layout, settings
        self.url = settings.gpu_cluster_api_url.rstrip("/")
        self.max_artifact_bytes = settings.max_artifact_mb * 2**20   # USF_MAX_ARTIFACT_MB
        # RunPod answers a status at once; the SDK's local endpoint runs the whole job inside its status call
        timeout = httpx.Timeout(30, read=900) if self._kind() == "runpod" else httpx.Timeout(30)
        client = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False,
                              headers={"Authorization": f"Bearer {settings.gpu_cluster_api_key}"})
        self.transport: Transport = transport or (RunPodTransport(client, layout.output) if self._kind() == "runpod"
                                                  else WorkerTransport(client, self.max_artifact_bytes))
        self._jobs: dict[str, RemoteJob] = {}
        self._jobs_lock = threading.Lock()
        if not settings.public_url:
            log.warning("USF_PUBLIC_URL is unset: remote jobs get dataset URLs and callbacks at %s, which a worker "
                        "on another host cannot reach", public_url(settings))

    def _kind(self) -> str:
        api = self.settings.remote_api
        return api if api != "auto" else ("runpod" if is_runpod_url(self.url) else "worker")

    # -- the interface ------------------------------------------------------------------------------
    def resources(self) -> Resources:
        # the remote side places jobs on its own GPUs and queues what does not fit; it refuses what it cannot run
        return Resources(gpus=1024, cpu_slots=1024)

    def start(self, job_id: str, gpu_ids: list[int]) -> str:
        job = self._job(job_id)
        with job.lock:
            # a new attempt (the first start, a resume, or after an interruption): a fresh window to answer in
            job.done, job.cancel_sent, job.reported, job.last_answer = False, 0, None, time.monotonic()
            job.submitted = False
            try:
                self._submit(job_id, job)
            except httpx.HTTPError as err:   # unreachable now: the poll submits again until the timeout
                log.warning("job %s: %s did not take the submit (%s); trying again", job_id, self.url, err)
        return job_id

    def poll(self, handle: str | None, cursor: int, job_id: str) -> Progress:
        job = self._job(job_id)
        if job.nudged or time.monotonic() - job.last_poll >= self.settings.remote_poll_s:
            with job.lock:
                self._pull(job_id, job)
        events, cursor = read_events(self.mirror(job_id), cursor)
        answered_lately = time.monotonic() - job.last_answer < self.settings.remote_timeout_s
        why = None if answered_lately else f"{self.describe(handle)} did not answer for {self.settings.remote_timeout_s:g} s"
        return Progress(events=events, cursor=cursor, alive=handle is not None and not job.done and answered_lately,
                        lost_reason=why)

    def cancel(self, handle: str, kill: bool) -> None:
        job = self._job(handle)
        want = 2 if kill else 1
        if job.external_id is None or job.cancel_sent >= want:
            return
        try:
            self.transport.cancel(job.external_id)
            job.cancel_sent = want
        except (httpx.HTTPError, RemoteRefused) as err:
            log.warning("job %s: cancel not delivered (%s); trying again", handle, err)
        job.nudged = True

    def describe(self, handle: str | None) -> str:
        job = self._known(handle or "")
        where = f"{'RunPod endpoint' if self.transport.kind == 'runpod' else 'worker'} {self.url}"
        return f"{where}, job {job.external_id}" if job and job.external_id else where

    def forget(self, handle: str) -> None:
        with self._jobs_lock:
            self._jobs.pop(handle, None)

    # -- callbacks and the UI -----------------------------------------------------------------------
    def receive(self, job_id: str, body: CallbackBody) -> None:
        """A callback's events, mirrored when they continue what is mirrored (else the next poll fetches them);
        the job is looked at again at once."""
        job = self._job(job_id)
        with job.lock:
            if job.external_id in (None, body.status.external_job_id):
                job.reported, job.last_answer = body.status, time.monotonic()
                self._take(job_id, job, body.events, body.after)
            job.nudged = True

    def remote_status(self, job_id: str) -> RemoteJobStatus | None:
        job = self._known(job_id)
        return job.reported if job else None

    def _known(self, job_id: str) -> RemoteJob | None:
        """What is known of a job, also after it was forgotten (from its sidecar), without creating anything."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        try:
            path = self._sidecar(job_id)
        except ValueError:
            return None
        if not path.is_file():
            return None
        job = self._job(job_id)
        self.forget(job_id)   # only read: a final job is not kept in memory
        return job

    def health(self) -> dict[str, object]:
        """Whether the remote side answers now (for /system), asked with a short timeout."""
        base = {"executor": self.name, "kind": self.transport.kind, "url": self.url}
        try:
            answer = self.transport.health()
        except (httpx.HTTPError, ValueError) as err:
            return {**base, "reachable": False, "detail": f"no answer: {err or type(err).__name__}"}
        return {**base, "reachable": True, "detail": answer}

    # -- inside -------------------------------------------------------------------------------------
    def mirror(self, job_id: str) -> Path:
        return self.layout.job_events(job_id)

    def _sidecar(self, job_id: str) -> Path:
        return confine(self.layout.logs, f"{job_id}.remote.json")

    def _job(self, job_id: str) -> RemoteJob:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None:
                job = RemoteJob()
                path = self._sidecar(job_id)
                if path.is_file():
                    saved = json.loads(path.read_text())
                    job.external_id, job.cursor, job.done = saved.get("external_job_id"), saved.get("cursor", 0), saved.get("done", False)
                    if saved.get("status"):
                        job.reported = RemoteJobStatus.model_validate(saved["status"])
                self._jobs[job_id] = job
            return job

    def _save(self, job_id: str, job: RemoteJob) -> None:
        path = self._sidecar(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"external_job_id": job.external_id, "cursor": job.cursor, "done": job.done,
                                   "where": self.url, "api": self.transport.kind,
                                   "status": job.reported.model_dump(mode="json") if job.reported else None}))
        tmp.replace(path)

    def _submit(self, job_id: str, job: RemoteJob) -> None:
        spec = locked_spec(job_id, self.layout)
        if spec.dataset is None:   # submit_job refuses a mixture for a remote job; a hand-made job.yaml may not
            raise RemoteRefused("a remote job takes one dataset (the worker contract sends one dataset_url)")
        dataset = Path(spec.dataset).resolve()
        if not dataset.is_relative_to(self.layout.datasets.resolve()):
            raise RemoteRefused(f"dataset {spec.dataset} is not a registered dataset; a remote job can only fetch those")
        dataset_id = dataset.relative_to(self.layout.datasets.resolve()).parts[0]
        request = spec.model_copy(update={"base_model": portable_model_name(Path(spec.base_model), self.layout)})
        callback = f"{public_url(self.settings)}/api/callbacks/training" if self.settings.callback_secret else None
        payload = submit_payload(job_id, signed_url(self.settings, f"/api/datasets/{dataset_id}/blob"), request, callback)
        if self.transport.kind == "runpod":
            payload["artifact_upload_url"] = signed_url(self.settings, f"/api/jobs/{job_id}/artifact")
        external = self.transport.submit(payload, job.external_id)
        if external != job.external_id:
            job.external_id, job.cursor, job.done = external, 0, False
        job.last_answer, job.nudged, job.submitted = time.monotonic(), True, True
        self._save(job_id, job)
        log.info("job %s submitted to %s as %s", job_id, self.url, external)

    def _pull(self, job_id: str, job: RemoteJob) -> None:
        job.last_poll, job.nudged = time.monotonic(), False
        try:
            if job.external_id is None or not job.submitted:   # what the remote side says counts once it took it
                self._submit(job_id, job)
            assert job.external_id is not None
            snapshot: Snapshot = self.transport.snapshot(job.external_id, job_id)
            job.reported, job.last_answer = snapshot.status, time.monotonic()
            self._save(job_id, job)
            artifact = snapshot.status.artifact
            if artifact is not None and artifact.size_bytes > self.max_artifact_bytes and not job.done:
                raise RemoteRefused(f"the artifact of {artifact.size_bytes >> 20} MB is over USF_MAX_ARTIFACT_MB "
                                    f"({self.settings.max_artifact_mb} MB)")
            if snapshot.events is not None:
                self._take(job_id, job, snapshot.events, snapshot.after)
                # a done event it could take, held back until the artifact is here (the next poll tries again)
                pending = snapshot.after <= job.cursor and any(e.seq > job.cursor and e.event.get("type") == "done"
                                                               for e in snapshot.events)
            else:
                while (page := self.transport.events(job.external_id, job.cursor)) and page.events:
                    if not self._take(job_id, job, page.events, job.cursor):
                        break
                pending = bool(page and page.events)   # stopped before a done event until the artifact is here
            ended = snapshot.status.status not in ALIVE and not job.done and not pending
            if ended and snapshot.status.status == "completed":
                self._complete_without_done(job_id, job, snapshot.status)
            elif ended:
                # ended without a done event of its own (refused by the worker, cancelled before it started)
                self._end(job_id, job, JobStatus(snapshot.status.status),
                          snapshot.status.error or f"the remote job is {snapshot.status.status}")
        except RemoteRefused as err:
            self._end(job_id, job, JobStatus.FAILED, str(err))
        except (httpx.HTTPError, ValueError) as err:
            log.warning("job %s: %s did not answer (%s)", job_id, self.url, err)

    def _complete_without_done(self, job_id: str, job: RemoteJob, status: RemoteJobStatus) -> None:
        """The remote side completed, but no done event past the cursor reached here (a RunPod output cut short, or
        a completion callback ahead of the artifact's upload): once the artifact is here the job completes."""
        if status.artifact is None:
            return
        if self._fetch_artifact(job_id, job):
            log.warning("job %s: completed remotely without a done event after %d; completed from its artifact",
                        job_id, job.cursor)
            self._end(job_id, job, JobStatus.COMPLETED, None)

    def _end(self, job_id: str, job: RemoteJob, status: JobStatus, error: str | None) -> None:
        self._append(job_id, [DoneEvent(status=status, error=error if status != JobStatus.CANCELLED else None)])
        job.done = True
        self._save(job_id, job)

    def _take(self, job_id: str, job: RemoteJob, events: list[SequencedEvent], after: int) -> bool:
        """Mirror the events that continue what is mirrored (in order; those already here skipped by their sequence
        number, so overlapping windows — RunPod's progress updates, a callback and a poll — are taken once); stop before
        the done event of a completed job until its artifact is here. True when every event was taken."""
        if after > job.cursor:
            return False   # a gap: the poll fetches what is missing
        taken, complete = [], True
        for item in events:
            if item.seq <= job.cursor:
                continue
            event = item.typed()
            if isinstance(event, DoneEvent) and event.status == JobStatus.COMPLETED and not self._fetch_artifact(job_id, job):
                complete = False
                break
            taken.append(event)
            job.cursor = item.seq
            if isinstance(event, DoneEvent):
                job.done = True
                break
        if taken:
            self._append(job_id, taken)
            self._save(job_id, job)
        return complete and not job.done

    def _append(self, job_id: str, events: list) -> None:
        path = self.mirror(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(event.model_dump_json() + "\n" for event in events))

    def _fetch_artifact(self, job_id: str, job: RemoteJob) -> bool:
        """Bring the completed job's tar here, check its sha256 and unpack it into the job's output folder."""
        status = job.reported
        if status is None or status.artifact is None:
            return False
        if status.artifact.size_bytes > self.max_artifact_bytes:
            log.warning("job %s: the artifact of %d bytes is over USF_MAX_ARTIFACT_MB; not fetched", job_id,
                        status.artifact.size_bytes)
            return False
        partial = self.layout.output / f"{job_id}.artifact.part"
        try:
            sha256 = self.transport.fetch_artifact(job.external_id or "", job_id, partial)
            if sha256 != status.artifact.sha256:
                log.warning("job %s: the artifact's sha256 %s is not the remote %s; fetching it again", job_id, sha256,
                            status.artifact.sha256)
                return False
            with tarfile.open(partial) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name not in ARTIFACT_SKIP]
                tar.extractall(self.layout.job_output(job_id), members=members, filter="data")
            log.info("job %s: artifact of %d bytes (sha256 %s…) in %s", job_id, status.artifact.size_bytes, sha256[:12],
                     self.layout.job_output(job_id))
            return True
        except (httpx.HTTPError, tarfile.TarError, OSError) as err:
            log.warning("job %s: the artifact did not arrive (%s); trying again", job_id, err)
            return False
        finally:
            partial.unlink(missing_ok=True)
