"""The FastAPI application: the API routers, the web dashboard, error shapes, and the scheduler's lifetime."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from usf_bios import __version__
from usf_bios.api.bodies import BodyGuard
from usf_bios.api.docs import mount_docs
from usf_bios.api.guard import RequestGuard, is_loopback_name
from usf_bios.api.logs import AccessLog, flush_access_logs, install_key_redaction
from usf_bios.api.reads import FastReads, Reads
from usf_bios.serverlog import log_to_stderr
from usf_bios.api.routes import (datasets, exports, jobs, keys, models, openai_finetune, openai_inference, presets,
                                 remote, system)
from usf_bios.control.datasets import sweep_orphan_uploads
from usf_bios.control.db import Database, migrate
from usf_bios.control.errors import Busy, Conflict, DomainError, Forbidden, Invalid, NotFound, Unsupported
from usf_bios.datasets.formats import DatasetError
from usf_bios.inference.engine import InferenceEngine
from usf_bios.settings import Settings
from usf_bios.spec import field_errors
from usf_bios.storage import StorageLayout
from usf_bios.web import mount_web

log = logging.getLogger("usf_bios.server")
DOMAIN_STATUS: dict[type[DomainError], int] = {NotFound: 404, Conflict: 409, Forbidden: 403, Unsupported: 415,
                                               Invalid: 422, Busy: 503}


def is_loopback(host: str) -> bool:
    """Whether the address the server binds to is a loopback one (then API keys are optional)."""
    return is_loopback_name(host.strip().strip("[]").lower())


def error_response(exc: Exception) -> JSONResponse:
    """A domain error or a dataset fault as the API's JSON error shapes: ``{"detail"}``; 422s also carry
    ``errors: [{"field", "message"}]`` (a field at fault) or ``file, line, unit, reason`` (a dataset's line)."""
    if isinstance(exc, DatasetError):
        return JSONResponse({"detail": str(exc), "file": exc.file, "line": exc.line, "unit": exc.unit,
                             "reason": exc.reason}, status_code=422)
    code = next((c for kind, c in DOMAIN_STATUS.items() if isinstance(exc, kind)), 400)
    body: dict[str, Any] = {"detail": str(exc)}
    if isinstance(exc, Invalid):
        body["errors"] = exc.errors()
    return JSONResponse(body, status_code=code, headers={"Retry-After": "2"} if isinstance(exc, Busy) else None)


def _authenticator(app: FastAPI) -> Any:
    """The caller of a presented key, from the cache of valid keys or the store (api/bodies.py calls it before
    reading a body)."""
    async def authenticate(key: str | None) -> Any:
        return None if key is None else await app.state.reads.caller(key)

    return authenticate


def adopt_storage(db: Database, layout: StorageLayout, settings: Settings) -> None:
    """At start: register the model folders (scan, as the local user) and adopt the jobs the store does not know
    (control/adopt.py), so what `usf-bios train` and `usf-bios demo` made is visible at once."""
    from usf_bios.control.adopt import adopt_jobs
    from usf_bios.control.keys import LOCAL_USER
    from usf_bios.control.models import scan_models

    with db.session() as session:
        try:
            scan_models(session=session, caller=LOCAL_USER, layout=layout, settings=settings)
        except Exception:  # a folder the scan cannot read must not keep the server from starting
            session.rollback()
            log.exception("the model scan at start failed")
        result = adopt_jobs(session=session, layout=layout, settings=settings)
    if result.adopted:
        log.info("adopted %d job(s) found in %s", len(result.adopted), layout.output)
    for folder, reason in result.skipped:
        log.warning("job folder %s not adopted: %s", folder, reason)


async def freeze_imports(every_s: float = 2.0) -> None:
    """What module imports make (torch's among them: ~300,000 objects at start, ~120,000 more from the modules the
    routes import on first use) lives as long as the process, yet each full garbage collection walked it all, in
    60-130 ms with every request waiting. Frozen (``gc.freeze``), the collector looks only at what came after: at
    start, and again whenever modules were imported since the last look."""
    imported = -1
    while True:
        if len(sys.modules) != imported:
            imported = len(sys.modules)
            gc.collect()
            gc.freeze()
        await asyncio.sleep(every_s)


def create_app(settings: Settings, host: str = "127.0.0.1", start_scheduler: bool = True,
               access_log: bool = False) -> FastAPI:
    """The app for these settings; ``host`` decides whether API keys are required. ``access_log``: the app writes
    the access log itself (api/logs.AccessLog; uvicorn's own is then turned off), as `usf-bios serve` does."""
    from usf_bios.control.adopt import INTERVAL_S as ADOPT_INTERVAL_S
    from usf_bios.control.pulls import Pulls
    from usf_bios.control.scheduler import Scheduler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_key_redaction()   # uvicorn has configured its loggers by now
        log_to_stderr()   # the scheduler's, the remote executor's and the inference engine's lines
        sweep_orphan_uploads(app.state.layout)
        migrate(settings.database_url or "")
        app.state.db = Database(settings.database_url or "")
        app.state.reads = Reads(app.state.db)
        await run_in_threadpool(adopt_storage, app.state.db, app.state.layout, settings)
        app.state.feeds = {}   # job id → the one live feed its event streams share (api/feeds.py)
        app.state.scheduler = Scheduler(app.state.db, app.state.layout, settings, adopt_every=ADOPT_INTERVAL_S)
        app.state.pulls = Pulls(app.state.db, app.state.layout, settings)
        if start_scheduler:
            app.state.scheduler.start()
        freezer = asyncio.get_running_loop().create_task(freeze_imports())
        yield
        freezer.cancel()
        app.state.inference.close()
        app.state.scheduler.stop()
        app.state.db.engine.dispose()
        flush_access_logs()   # the requests of the last 0.2 s

    if settings.executor == "ray":   # one clear line at start, not a traceback from the scheduler's thread
        from usf_bios.control.executors.ray import ExecutorUnavailable, check_ray

        try:
            check_ray()
        except ExecutorUnavailable as err:
            raise SystemExit(f"error: {err}") from None
    app = FastAPI(title="USF BIOS", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Self-hostable LoRA / QLoRA fine-tuning: datasets, models, jobs, live metrics.")
    app.state.settings = settings
    app.state.layout = StorageLayout.from_settings(settings)
    app.state.layout.ensure()
    app.state.auth_required = settings.require_auth or not is_loopback(host)
    app.state.inference = InferenceEngine(max_adapters=settings.max_loaded_adapters, idle_s=settings.inference_idle_s,
                                          queue_size=settings.inference_queue, max_batch=settings.inference_batch,
                                          backend=settings.inference_backend)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(list(exc.errors()), where="body", skip=("body",))
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(DomainError)
    async def _domain(_request: Request, exc: DomainError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(SQLAlchemyTimeoutError)
    async def _busy(_request: Request, _exc: SQLAlchemyTimeoutError) -> JSONResponse:
        return JSONResponse({"detail": "the server is busy (no database connection was free); try again shortly"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(DatasetError)
    async def _dataset(_request: Request, exc: DatasetError) -> JSONResponse:
        return error_response(exc)

    # DNS rebinding (Host) when no API key protects the server; cross-site writes (Origin) always
    allowed_hosts = None if app.state.auth_required else {host, settings.host, *settings.allowed_hosts}
    app.add_middleware(BodyGuard, max_json_bytes=settings.max_json_kb * 1024,
                       authenticate=_authenticator(app) if app.state.auth_required else None)
    app.add_middleware(FastReads, auth_required=app.state.auth_required)   # after the guard, before any routing
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    if access_log:
        app.add_middleware(AccessLog)   # added last: runs first, so it sees the guard's refusals too

    for module in (system, keys, remote, datasets, models, jobs, presets):
        app.include_router(module.router, prefix="/api")
    app.include_router(openai_inference.admin_router, prefix="/api")
    app.include_router(exports.router, prefix="/api")
    for module in (openai_inference, openai_finetune):   # the OpenAI-compatible surface (docs/inference.md)
        app.include_router(module.router, prefix="/v1")
    mount_docs(app)   # /docs and /redoc with their assets from a wheel, no CDN
    mount_web(app)
    return app


def app_factory() -> Any:
    """The app for `uvicorn --factory usf_bios.api.main:app_factory`. uvicorn's --host never reaches the app, so
    it cannot know it is bound to loopback only: it always requires API keys (fail closed). `usf-bios serve` is
    the way to run without keys on loopback."""
    from usf_bios.settings import get_settings

    settings = get_settings()
    return create_app(settings.model_copy(update={"require_auth": True}), settings.host)
