"""HTML fragments that htmx swaps into the pages: lists rendered on the server for the caller only.

Every fragment takes the same API key as /api (``CurrentCaller``) and reads through the same functions
the REST routes use, so what a key cannot see through /api it cannot see here either."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep
from usf_bios.api.routes.datasets import list_datasets
from usf_bios.api.routes.jobs import find_jobs
from usf_bios.api.routes.keys import list_keys
from usf_bios.api.routes.models import list_models
from usf_bios.api.routes.system import host_facts
from usf_bios.control.lifecycle import JobStatus
from usf_bios.web.render import render_fragment

router = APIRouter(prefix="/ui", include_in_schema=False)

ACTIVE = [s for s in JobStatus if not s.is_terminal]
FINISHED = [s for s in JobStatus if s.is_terminal]
JOBS_SHOWN = 100


@router.get("/system", response_class=HTMLResponse)
def system(request: Request, _caller: CurrentCaller, layout: LayoutDep) -> HTMLResponse:
    return render_fragment(request, "fragments/system.html", facts=host_facts(layout))


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, caller: CurrentCaller, session: SessionDep,
         view: Literal["active", "recent", "all"] = "all",
         status: Annotated[JobStatus | Literal[""], Query()] = "") -> HTMLResponse:
    """active: not final yet; recent: the last five final ones; all: every job (or one status; '' = any)."""
    if view == "active":
        items, total = find_jobs(session, caller, ACTIVE, JOBS_SHOWN)
    elif view == "recent":
        items, total = find_jobs(session, caller, FINISHED, 5)
    else:
        items, total = find_jobs(session, caller, [status] if status else None, JOBS_SHOWN)
    return render_fragment(request, "fragments/jobs.html", jobs=items, total=total, view=view)


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    return render_fragment(request, "fragments/datasets.html", datasets=list_datasets(caller, session))


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    return render_fragment(request, "fragments/models.html", models=list_models(caller, session))


@router.get("/keys", response_class=HTMLResponse)
def keys(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    """Admins see every key; anyone else a note (the keys API answers them 403)."""
    rows = list_keys(caller, session) if caller.is_admin else None
    return render_fragment(request, "fragments/keys.html", keys=rows, is_admin=caller.is_admin)
