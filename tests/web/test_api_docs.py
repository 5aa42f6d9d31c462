"""/docs (Swagger UI) and /redoc render in Chromium with every request off the server refused: their scripts and
styles come from the package (fastapi-offline's wheel), not a CDN (issue 18, item 6)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect


@pytest.fixture
def offline_page(server, open_page):
    """A page on the server that can reach nothing else: every other host's request is aborted and recorded."""
    page = open_page(server.url)
    outside: list[str] = []

    def route(route_):
        if urlsplit(route_.request.url).hostname == "127.0.0.1":
            route_.continue_()
        else:
            outside.append(route_.request.url)
            route_.abort()

    page.route("**/*", route)
    return page, outside


def test_swagger_ui_renders_offline(offline_page):
    page, outside = offline_page
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("USF BIOS")
    expect(page.locator(".opblock-summary-path[data-path='/api/jobs']").first).to_be_visible()
    assert page.evaluate("typeof SwaggerUIBundle") == "function"
    page.locator(".opblock-summary-path[data-path='/api/health']").first.click()     # the operation opens
    expect(page.locator(".opblock.is-open")).to_have_count(1)
    assert outside == []


def test_redoc_renders_offline(offline_page, console):
    page, outside = offline_page
    # the one outside address in ReDoc's bundle is its sidebar logo: the page's policy refuses it (no request
    # leaves) and ReDoc hides the image
    console.allow(r"'https://cdn\.redoc\.ly/redoc/logo-mini\.svg' violates the following Content Security Policy")
    page.goto("/redoc")
    expect(page.locator("h1").first).to_contain_text("USF BIOS")
    expect(page.get_by_text("/api/jobs/estimate").first).to_be_attached()
    assert outside == []


def test_the_docs_pages_name_no_cdn(server):
    import httpx

    for path in ("/docs", "/redoc"):
        response = httpx.get(server.url + path)
        html = response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "cdn.jsdelivr.net" not in html and "fonts.googleapis.com" not in html and "/static-docs/" in html
    assert httpx.get(server.url + "/static-docs/swagger-ui-bundle.js").status_code == 200
