"""The FastAPI application: the API routers, the web dashboard, error shapes, and the scheduler's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from usf_bios import __version__
from usf_bios.api.guard import RequestGuard, is_loopback_name
from usf_bios.api.routes import datasets, jobs, keys, models, system
from usf_bios.control.db import Database, migrate
from usf_bios.control.jobs import JobRequestError
from usf_bios.settings import Settings
from usf_bios.spec import _reason
from usf_bios.storage import StorageLayout
from usf_bios.web import mount_web


def is_loopback(host: str) -> bool:
    """Whether the address the server binds to is a loopback one (then API keys are optional)."""
    return is_loopback_name(host.strip().strip("[]").lower())


def _field_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    errors = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not str(p).startswith(("literal[", "list["))]
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            message = f"malformed JSON: {ctx.get('error', error.get('msg'))}"
            loc = loc[:0] or ["body"]
        else:
            message = _reason(error)
        errors.append({"field": ".".join(loc) or "body", "message": message})
    return errors


def create_app(settings: Settings, host: str = "127.0.0.1", start_scheduler: bool = True) -> FastAPI:
    """The app for these settings; ``host`` decides whether API keys are required."""
    from usf_bios.control.scheduler import Scheduler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(settings.database_url or "")
        app.state.db = Database(settings.database_url or "")
        app.state.scheduler = Scheduler(app.state.db, app.state.layout, settings)
        if start_scheduler:
            app.state.scheduler.start()
        yield
        app.state.scheduler.stop()
        app.state.db.engine.dispose()

    app = FastAPI(title="USF BIOS", version=__version__, lifespan=lifespan,
                  description="Self-hostable LoRA / QLoRA fine-tuning: datasets, models, jobs, live metrics.")
    app.state.settings = settings
    app.state.layout = StorageLayout.from_settings(settings)
    app.state.layout.ensure()
    app.state.auth_required = settings.require_auth or not is_loopback(host)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(JobRequestError)
    async def _job_request(_request: Request, exc: JobRequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": exc.errors()}, status_code=422)

    # DNS rebinding (Host) when no API key protects the server; cross-site writes (Origin) always
    allowed_hosts = None if app.state.auth_required else {host, settings.host, *settings.allowed_hosts}
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)

    for module in (system, keys, datasets, models, jobs):
        app.include_router(module.router, prefix="/api")
    mount_web(app)
    return app


def app_factory() -> Any:  # for `uvicorn --factory usf_bios.api.main:app_factory`
    from usf_bios.settings import get_settings

    settings = get_settings()
    return create_app(settings, settings.host)
