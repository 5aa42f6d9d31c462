"""Jinja2 setup: the templates folder, display filters, and the security headers of every page."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from usf_bios import __version__
from usf_bios.control.lifecycle import ALLOWED, JobStatus
from usf_bios.control.tables import as_utc

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")

# Scripts and styles only from this server: no inline script, no inline style, no eval.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def human_bytes(value: int | float | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def human_count(value: int | None) -> str:
    """134515008 → '134.5M'."""
    if value is None:
        return "—"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def when(value: datetime | float | None) -> str:
    """A UTC timestamp as '2026-03-01 14:05 UTC' (the browser rewrites it to local time)."""
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    return as_utc(value).strftime("%Y-%m-%d %H:%M UTC")  # type: ignore[union-attr]


def iso(value: datetime | None) -> str:
    return "" if value is None else as_utc(value).isoformat()  # type: ignore[union-attr]


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


TEMPLATES.env.filters.update(human_bytes=human_bytes, human_count=human_count, when=when, iso=iso, percent=percent)

# The status groups the pages need, from the one transition table; base.html hands them to the scripts
# (data-job-statuses on <body>, read by app.js), so no script keeps its own copy.
JOB_STATUSES = {
    "all": [s.value for s in JobStatus],
    "final": [s.value for s in JobStatus if s.is_terminal],
    "active": [s.value for s in JobStatus if s.is_active],
    # as control.jobs.cancel_job moves them: a queued job straight to cancelled, any other to cancelling
    "cancellable": [s.value for s in JobStatus
                    if (JobStatus.CANCELLED if s is JobStatus.QUEUED else JobStatus.CANCELLING) in ALLOWED[s]],
    "resumable": [s.value for s in JobStatus if JobStatus.QUEUED in ALLOWED[s]],
}
TEMPLATES.env.globals["job_statuses"] = JOB_STATUSES


def render_page(request: Request, template: str, page: str, title: str, **context: Any) -> HTMLResponse:
    """A full page with the security headers; ``page`` marks the current item of the navigation."""
    context = {"page": page, "title": title, "auth_required": request.app.state.auth_required,
               "version": __version__, **context}
    response = TEMPLATES.TemplateResponse(request, template, context)
    response.headers.update(SECURITY_HEADERS)
    return response


def render_fragment(request: Request, template: str, **context: Any) -> HTMLResponse:
    """A piece of HTML for htmx, with the same security headers as a page (it can be opened on its own)."""
    response = TEMPLATES.TemplateResponse(request, template, context)
    response.headers.update(SECURITY_HEADERS)
    return response
