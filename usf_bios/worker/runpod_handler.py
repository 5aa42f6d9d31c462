"""The GPU worker as a RunPod serverless handler: ``python -m usf_bios.worker.runpod_handler`` in the worker image.

A RunPod job's ``input`` is the /training/submit payload. The handler runs it with the same ``WorkerService`` as
`usf-bios worker` (its storage on the network volume: USF_HOME, MODEL_PATH or USF_MODEL_PATH, HF_HOME), so a
job sent again after the container was recycled continues from its checkpoint. While it trains, the handler
sends RunPod progress updates (the contract's status and the new events), and the signed callbacks go to
``callback_url`` as from the HTTP worker. A completed job's output folder is PUT as a tar to
``artifact_upload_url`` (a signed URL of the control plane); the handler's output is the final status with its
artifact's size and sha256 and every event (paged from the worker, not one page), or ``{"error": …}`` for a job that failed.

RunPod's own SDK drives it: ``runpod.serverless.start({"handler": handler})``; its local modes run it here too
(``--test_input '{"input": {…}}'`` once, or ``--rp_serve_api`` as a local endpoint).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import httpx
from pydantic import ValidationError

from usf_bios.control.errors import DomainError
from usf_bios.worker.contract import SubmitRequest
from usf_bios.worker.service import worker_settings

PROGRESS_INTERVAL_S = 5.0
WATCH_S = 0.5          # how often the handler looks at its job
PROGRESS_OVERLAP = 4   # each progress update repeats the events of the previous three
_service_lock = threading.Lock()
_running: dict[str, Any] = {}


def service() -> Any:
    """One WorkerService (and callback sender) per container, started on first use."""
    from usf_bios.worker.callbacks import CallbackSender
    from usf_bios.worker.service import WorkerService

    with _service_lock:
        if "service" not in _running:
            worker = WorkerService(worker_settings())
            worker.start()
            sender = CallbackSender(worker)
            sender.start()
            _running.update(service=worker, sender=sender)
        return _running["service"]


def _progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):   # only inside RunPod; the SDK's local modes have no endpoint
        import runpod

        runpod.serverless.progress_update(job, update)


def all_events(worker: Any, external: str, after: int) -> list[dict[str, Any]]:
    """Every event of the job after ``after``, page by page (a page holds at most MAX_EVENTS_PAGE)."""
    events: list[dict[str, Any]] = []
    while (page := worker.events(external, after)).events:
        events.extend(e.model_dump(mode="json") for e in page.events)
        after = page.next
    return events


def upload_artifact(url: str, path: Any, expected_sha256: str, allowed_hosts: tuple[str, ...]) -> None:
    """PUT the tar to the control plane's signed URL (behind the SSRF guard; its answer checks the sha256)."""
    from usf_bios.netguard import put_stream

    def body() -> Any:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    code = put_stream(url, body(), allowed_hosts=allowed_hosts,
                      headers={"Content-Type": "application/x-tar", "X-Artifact-Sha256": expected_sha256})
    if not 200 <= code < 300:
        raise httpx.HTTPError(f"the artifact upload was answered {code}")


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Run one submit to its end; RunPod's job output."""
    raw = dict(job.get("input") or {})
    upload_url = raw.pop("artifact_upload_url", None)
    try:
        request = SubmitRequest.model_validate(raw)
    except ValidationError as err:
        return {"error": f"input: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}"}
    worker = service()
    try:
        external = worker.submit(request)
    except DomainError as err:
        return {"error": str(err)}
    starts: deque[int] = deque([0], maxlen=PROGRESS_OVERLAP)   # where the last updates' windows ended
    last_update = 0.0
    while True:
        status = worker.status(external)
        if status.status in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() - last_update >= PROGRESS_INTERVAL_S:
            events = all_events(worker, external, starts[0])
            _progress(job, {"status": status.model_dump(mode="json"), "after": starts[0], "events": events})
            starts.append(events[-1]["seq"] if events else starts[-1])
            last_update = time.monotonic()
        time.sleep(WATCH_S)
    if status.status == "completed" and upload_url and status.artifact is not None:
        upload_artifact(upload_url, worker.artifact_path(external), status.artifact.sha256,
                        worker.settings.worker_allowed_hosts)
    output = {"status": status.model_dump(mode="json"), "after": 0, "events": all_events(worker, external, 0)}
    if status.status == "failed":
        return {"error": status.error or "the job failed", **output}
    return output


def main() -> None:
    import runpod

    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
