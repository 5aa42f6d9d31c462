"""How the remote executor talks to where jobs run: a `usf-bios worker` (the /training/* contract) or a RunPod
serverless endpoint running ``usf_bios.worker.runpod_handler`` (RunPod's /run, /status/{id}, /cancel/{id}).

Both answer in the contract's models: a ``RemoteJobStatus`` and the typed events after a sequence number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from usf_bios.worker.contract import EventsPage, RemoteJobStatus, SequencedEvent, SubmitAccepted


class RemoteRefused(OSError):
    """The remote side refused the job or no longer knows it (its message says why); the job fails with it."""


@dataclass
class Snapshot:
    status: RemoteJobStatus
    events: list[SequencedEvent] | None = None   # events that came with the status (RunPod's output), if any
    after: int = 0                               # the sequence number those events continue from


class Transport(Protocol):
    kind: str

    def submit(self, payload: dict[str, Any], known: str | None) -> str: ...
    def snapshot(self, external: str, job_id: str) -> Snapshot: ...
    def events(self, external: str, after: int) -> EventsPage | None: ...
    def cancel(self, external: str) -> None: ...
    def fetch_artifact(self, external: str, job_id: str, dest: Path) -> str: ...
    def health(self) -> str: ...


def _detail(answer: httpx.Response) -> str:
    try:
        body = answer.json()
        return str(body.get("detail") or body.get("error") or body)
    except ValueError:
        return answer.text[:500]


def _checked(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code in (400, 401, 403, 404, 409, 413, 422):
        raise RemoteRefused(f"the {answer.request.url.host} answered {answer.status_code}: {_detail(answer)}")
    answer.raise_for_status()
    return answer.json()


def _stream_to(client: httpx.Client, path: str, dest: Path, max_bytes: int) -> str:
    """The body of GET ``path`` into ``dest``, its sha256; cut off (RemoteRefused) past ``max_bytes``."""
    digest, size = hashlib.sha256(), 0
    with client.stream("GET", path) as answer:
        answer.raise_for_status()
        with dest.open("wb") as out:
            for chunk in answer.iter_bytes(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise RemoteRefused(f"the artifact is over USF_MAX_ARTIFACT_MB ({max_bytes >> 20} MB); cut off")
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


class WorkerTransport:
    """`usf-bios worker`: submit is idempotent on job_id; events and the artifact are fetched from it."""

    kind = "worker"

    def __init__(self, client: httpx.Client, max_artifact_bytes: int):
        self.client, self.max_artifact_bytes = client, max_artifact_bytes

    def submit(self, payload: dict[str, Any], known: str | None) -> str:
        return SubmitAccepted.model_validate(_checked(self.client.post("/training/submit", json=payload))).external_job_id

    def snapshot(self, external: str, job_id: str) -> Snapshot:
        return Snapshot(RemoteJobStatus.model_validate(_checked(self.client.get(f"/training/status/{external}"))))

    def events(self, external: str, after: int) -> EventsPage | None:
        return EventsPage.model_validate(_checked(self.client.get(f"/training/events/{external}", params={"after": after})))

    def cancel(self, external: str) -> None:
        _checked(self.client.post(f"/training/cancel/{external}"))

    def fetch_artifact(self, external: str, job_id: str, dest: Path) -> str:
        return _stream_to(self.client, f"/training/artifacts/{external}", dest, self.max_artifact_bytes)

    def health(self) -> str:
        answer = self.client.get("/health", timeout=3)
        answer.raise_for_status()
        body = answer.json()
        return f"usf-bios worker {body.get('version', '?')}, {body.get('gpus', 0)} GPU(s)"


RUNPOD_STATUS = {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "COMPLETED": "completed", "FAILED": "failed",
                 "TIMED_OUT": "failed", "CANCELLED": "cancelled"}


class RunPodTransport:
    """A RunPod serverless endpoint: the submit is the job's input; status, events and the artifact's checksum come
    in the job's output (progress updates while it runs, the final output at the end); the artifact itself is PUT
    by the handler to the control plane's signed upload URL, so it is already here."""

    kind = "runpod"

    def __init__(self, client: httpx.Client, artifact_dir: Path):
        self.client, self.artifact_dir = client, artifact_dir

    def submit(self, payload: dict[str, Any], known: str | None) -> str:
        if known is not None:
            state = self._status(known)
            if state.get("status") in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"):
                return known
        answer = _checked(self.client.post("/run", json={"input": payload}))
        return str(answer["id"])

    def _status(self, external: str) -> dict[str, Any]:
        answer = self.client.get(f"/status/{external}")
        if answer.status_code == 405:   # the SDK's local endpoint takes POST only
            answer = self.client.post(f"/status/{external}")
        return _checked(answer)

    def snapshot(self, external: str, job_id: str) -> Snapshot:
        state = self._status(external)
        status_word = RUNPOD_STATUS.get(str(state.get("status")), "queued")
        output = state.get("output") if isinstance(state.get("output"), dict) else {}
        reported = output.get("status") if isinstance(output.get("status"), dict) else None
        if reported is not None:
            status = RemoteJobStatus.model_validate({**reported, "status": status_word if status_word != "completed"
                                                     else reported.get("status", "completed")})
        else:
            status = RemoteJobStatus(external_job_id=external, job_id=job_id, status=status_word)  # type: ignore[arg-type]
        if status_word == "failed":
            status = status.model_copy(update={"status": "failed",
                                               "error": status.error or str(state.get("error") or "the RunPod job failed")})
        events = [SequencedEvent.model_validate(e) for e in output.get("events", [])] if "events" in output else None
        return Snapshot(status, events, int(output.get("after", 0) or 0))

    def events(self, external: str, after: int) -> EventsPage | None:
        return None   # they come with the status

    def cancel(self, external: str) -> None:
        _checked(self.client.post(f"/cancel/{external}"))

    def health(self) -> str:
        answer = self.client.get("/health", timeout=3)
        if answer.status_code == 404:   # the SDK's local endpoint has no /health
            answer = self.client.get("/openapi.json", timeout=3)
            answer.raise_for_status()
            return "RunPod SDK local endpoint"
        answer.raise_for_status()
        body = answer.json()
        workers = body.get("workers", {}) if isinstance(body, dict) else {}
        return f"RunPod endpoint, workers: {workers}" if workers else "RunPod endpoint"

    def fetch_artifact(self, external: str, job_id: str, dest: Path) -> str:
        uploaded = uploaded_artifact(self.artifact_dir, job_id)
        if not uploaded.is_file():
            raise FileNotFoundError(f"the handler has not uploaded the artifact of {job_id} yet")
        uploaded.replace(dest)
        digest = hashlib.sha256()
        with dest.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def uploaded_artifact(folder: Path, job_id: str) -> Path:
    """Where the control plane keeps a tar PUT to a job's signed upload URL."""
    from usf_bios.storage import confine

    return confine(folder, f"{job_id}.uploaded.tar")


def is_runpod_url(url: str) -> bool:
    """A RunPod endpoint URL: its host runpod.ai or a subdomain of it (not evilrunpod.ai)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    return host == "runpod.ai" or host.endswith(".runpod.ai")
