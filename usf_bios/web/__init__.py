"""The web dashboard: Jinja2 pages and HTMX fragments served by `usf-bios serve` next to /api.

Pages are shells that hold no user data; the browser fills them from /api and from the caller-scoped
fragments under /ui, sending its API key when the server requires one. Static files (the hand-written
CSS and JS, and the vendored htmx and uPlot) are served from /static; nothing comes from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_web(app: FastAPI) -> None:
    """Add /static, the pages and the fragments to the app."""
    from usf_bios.web import fragments, pages

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(pages.router)
    app.include_router(fragments.router)
