"""HTML fragments that htmx swaps into the pages: lists rendered on the server for the caller only.

Every fragment takes the same API key as /api (``CurrentCaller``) and reads through the same control-plane
functions the REST routes call, so what a key cannot see through /api it cannot see here either."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep
from usf_bios.control.datasets import list_datasets
from usf_bios.control.jobs import find_jobs
from usf_bios.control.keys import list_keys
from usf_bios.control.lifecycle import JobStatus
from usf_bios.control.models import list_models
from usf_bios.control.schemas import KeyPublic
from usf_bios.control.system import host_facts
from usf_bios.web.render import render_fragment

router = APIRouter(prefix="/ui", include_in_schema=False)

ACTIVE = [s for s in JobStatus if not s.is_terminal]
FINISHED = [s for s in JobStatus if s.is_terminal]
JOBS_SHOWN = 100


@router.get("/system", response_class=HTMLResponse)
def system(request: Request, _caller: CurrentCaller, layout: LayoutDep) -> HTMLResponse:
    return render_fragment(request, "fragments/system.html",
                           facts=host_facts(layout, request.app.state.scheduler.executors))


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, caller: CurrentCaller, session: SessionDep,
         view: Literal["active", "recent", "all"] = "all",
         status: Annotated[JobStatus | Literal[""], Query()] = "") -> HTMLResponse:
    """active: not final yet; recent: the last five final ones; all: every job (or one status; '' = any)."""
    if view == "active":
        found = find_jobs(session=session, caller=caller, statuses=ACTIVE, limit=JOBS_SHOWN)
    elif view == "recent":
        found = find_jobs(session=session, caller=caller, statuses=FINISHED, limit=5)
    else:
        found = find_jobs(session=session, caller=caller, statuses=[status] if status else None, limit=JOBS_SHOWN)
    return render_fragment(request, "fragments/jobs.html", jobs=found.items, total=found.total, view=view)


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    return render_fragment(request, "fragments/datasets.html", datasets=list_datasets(session=session, caller=caller))


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    return render_fragment(request, "fragments/models.html", models=list_models(session=session, caller=caller))


@router.get("/keys", response_class=HTMLResponse)
def keys(request: Request, caller: CurrentCaller, session: SessionDep) -> HTMLResponse:
    """Admins see every key; anyone else a note (the keys API answers them 403)."""
    rows = [KeyPublic.model_validate(row) for row in list_keys(session)] if caller.is_admin else None
    return render_fragment(request, "fragments/keys.html", keys=rows, is_admin=caller.is_admin)
