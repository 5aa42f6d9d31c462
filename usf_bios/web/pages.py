"""The dashboard's pages. Each is a shell: it names what to show (a job id, a dataset reference) and the
browser loads the data itself with the caller's key, so a page never holds another key's data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from usf_bios.datasets.formats import FORMATS
from usf_bios.models.hub import LABELS, SOURCES, default_revision, refusal
from usf_bios.presets import DEFAULT_PRESET
from usf_bios.web.forms import form_presets, job_form
from usf_bios.web.render import render_page

router = APIRouter(include_in_schema=False)
MAX_COMPARED = 8


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    return render_page(request, "home.html", "home", "Home")


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    return render_page(request, "jobs.html", "jobs", "Jobs")


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(request: Request, model: str = "", dataset: str = "",
            from_job: Annotated[str, Query(alias="from")] = "") -> HTMLResponse:
    """``?from=JOB_ID``: Edit & rerun, the form prefilled from that job's spec (the browser loads it with its key).
    The GPU field starts at what the server's executor has (0 on a host without a GPU)."""
    return render_page(request, "new_job.html", "jobs", "New job", form=job_form(), presets=form_presets(),
                       default_preset=DEFAULT_PRESET, chosen={"model": model, "dataset": dataset}, from_job=from_job,
                       host_gpus=host_gpus(request))


def host_gpus(request: Request) -> int:
    """The GPUs of the executor a job of the form runs on (the server's default one)."""
    executors = request.app.state.scheduler.executors
    executor = executors.get(request.app.state.settings.executor)
    return executor.resources().gpus if executor is not None else 0


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: str) -> HTMLResponse:
    return render_page(request, "job.html", "jobs", "Job", job_id=job_id)


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request) -> HTMLResponse:
    return render_page(request, "datasets.html", "datasets", "Datasets", formats=("auto", *FORMATS))


@router.get("/datasets/{ref}", response_class=HTMLResponse)
def dataset(request: Request, ref: str) -> HTMLResponse:
    return render_page(request, "dataset.html", "datasets", "Dataset", ref=ref)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request) -> HTMLResponse:
    enabled = request.app.state.settings.supported_model_sources
    hubs = [{"source": s, "label": LABELS[s], "revision": default_revision(s), "off": refusal(s, enabled)}
            for s in SOURCES]
    return render_page(request, "models.html", "models", "Models", hubs=hubs,
                       hub_enabled=any(h["off"] is None for h in hubs))


@router.get("/compare", response_class=HTMLResponse)
def compare(request: Request, jobs: Annotated[list[str], Query()] = []) -> HTMLResponse:  # noqa: B006
    """``?jobs=a&jobs=b`` or ``?jobs=a,b``: the runs to overlay."""
    chosen = [j for part in jobs for j in part.split(",") if j.strip()]
    return render_page(request, "compare.html", "compare", "Compare runs",
                       chosen=list(dict.fromkeys(chosen))[:MAX_COMPARED], max_compared=MAX_COMPARED)


@router.get("/chat", response_class=HTMLResponse)
def chat(request: Request, model: Annotated[list[str], Query()] = []) -> HTMLResponse:  # noqa: B006
    """``?model=a&model=b``: the models ticked when the page opens."""
    chosen = [m for part in model for m in part.split(",") if m.strip()]
    return render_page(request, "chat.html", "chat", "Chat", chosen=list(dict.fromkeys(chosen))[:MAX_COMPARED])


@router.get("/keys", response_class=HTMLResponse)
def keys(request: Request) -> HTMLResponse:
    return render_page(request, "keys.html", "keys", "API keys")


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> RedirectResponse:
    return RedirectResponse("/static/favicon.svg", status_code=301)
