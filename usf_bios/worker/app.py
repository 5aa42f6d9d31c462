"""`usf-bios worker`: the GPU worker contract over HTTP (ARCHITECTURE "GPU worker contract", docs/worker.md).

Every route but /health needs ``Authorization: Bearer $GPU_CLUSTER_API_KEY`` (compared in constant time); the app
refuses to be built without that key. The work is done by ``WorkerService``; callbacks by ``CallbackSender``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from usf_bios import __version__
from usf_bios.control.errors import Busy, Conflict, DomainError, Forbidden, Invalid, NotFound
from usf_bios.serverlog import log_to_stderr
from usf_bios.settings import Settings
from usf_bios.spec import field_errors
from usf_bios.worker.callbacks import CallbackSender
from usf_bios.worker.contract import EventsPage, RemoteJobStatus, SubmitAccepted, SubmitRequest
from usf_bios.worker.service import WorkerService

STATUS = {NotFound: 404, Conflict: 409, Forbidden: 403, Invalid: 422, Busy: 503}


class WorkerKeyMissing(RuntimeError):
    pass


class _Unauthorized(Exception):
    pass


def get_service(request: Request) -> WorkerService:
    return request.app.state.service


def require_key(request: Request) -> None:
    """``Authorization: Bearer $GPU_CLUSTER_API_KEY``, compared in constant time."""
    key: str = request.app.state.worker_key
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise _Unauthorized()


Service = Annotated[WorkerService, Depends(get_service)]


def create_worker_app(settings: Settings) -> FastAPI:
    key = settings.gpu_cluster_api_key
    if not key:
        raise WorkerKeyMissing("GPU_CLUSTER_API_KEY is not set: the worker refuses to start without the key its "
                               "callers must present")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_to_stderr()
        service = WorkerService(settings)
        sender = CallbackSender(service)
        app.state.service = service
        service.start()
        sender.start()
        yield
        sender.stop()
        service.stop()

    app = FastAPI(title="USF BIOS worker", version=__version__, lifespan=lifespan,
                  description="Runs training jobs on this host's GPUs for a control plane (the GPU worker contract).")
    app.state.worker_key = key


    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(list(exc.errors()), where="body", skip=("body",))
        return JSONResponse({"detail": "; ".join(f"{e['field']}: {e['message']}" for e in errors), "errors": errors},
                            status_code=422)

    @app.exception_handler(DomainError)
    async def _domain(_request: Request, exc: DomainError) -> JSONResponse:
        body: dict[str, Any] = {"detail": str(exc)}
        if isinstance(exc, Invalid):
            body["errors"] = exc.errors()
        return JSONResponse(body, status_code=next((c for k, c in STATUS.items() if isinstance(exc, k)), 400),
                            headers={"Retry-After": "2"} if isinstance(exc, Busy) else None)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "a valid Authorization: Bearer key is required"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    authed = [Depends(require_key)]

    @app.get("/health")
    def health(service: Service) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "gpus": service.gpus()}

    @app.post("/training/submit", status_code=202, dependencies=authed)
    async def submit(request: SubmitRequest, service: Service) -> SubmitAccepted:
        return SubmitAccepted(external_job_id=await run_in_threadpool(service.submit, request))

    @app.get("/training/status/{external_job_id}", dependencies=authed)
    def status(external_job_id: str, service: Service) -> RemoteJobStatus:
        return service.status(external_job_id)

    @app.post("/training/cancel/{external_job_id}", dependencies=authed)
    def cancel(external_job_id: str, service: Service) -> RemoteJobStatus:
        return service.cancel(external_job_id)

    @app.get("/training/events/{external_job_id}", dependencies=authed)
    def events(external_job_id: str, service: Service,
               after: Annotated[int, Query(ge=0, description="The sequence number to continue after.")] = 0) -> EventsPage:
        return service.events(external_job_id, after)

    @app.get("/training/artifacts/{external_job_id}", dependencies=authed, response_class=FileResponse)
    def artifacts(external_job_id: str, service: Service) -> FileResponse:
        status = service.status(external_job_id)
        if status.status != "completed" or status.artifact is None:
            raise Conflict(f"job {external_job_id} is {status.status}; its artifact exists once it completes")
        return FileResponse(service.artifact_path(external_job_id), media_type="application/x-tar",
                            filename=f"{external_job_id}.tar",
                            headers={"X-Artifact-Sha256": status.artifact.sha256})

    return app
