"""/docs (Swagger UI) and /redoc from files shipped in a wheel, not a CDN: the fastapi-offline package (MIT) carries
the built assets of Swagger UI (Apache-2.0) and ReDoc (MIT) with their licence headers, served here under
/static-docs. FastAPI's own pages would load them from jsDelivr (and ReDoc its fonts from Google). A
Content-Security-Policy keeps both pages on this server: ReDoc's sidebar links a logo from its CDN, which the
browser then never fetches (ReDoc hides the image when it does not load)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/static-docs"
REDIRECT_URL = "/docs/oauth2-redirect"
# the pages' own inline start-up script and styles are allowed; nothing from another host; ReDoc's search runs in a
# worker made from a blob
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _headed(response: HTMLResponse) -> HTMLResponse:
    response.headers.update({"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff"})
    return response


def mount_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect page, /redoc and their assets to an app made with ``docs_url=None`` and
    ``redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="static-docs")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return _headed(get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} — API", oauth2_redirect_url=REDIRECT_URL,
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg"))

    @app.get(REDIRECT_URL, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return _headed(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return _headed(get_redoc_html(openapi_url=openapi_url, title=f"{app.title} — API", with_google_fonts=False,
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js", redoc_favicon_url="/static/favicon.svg"))
