"""Every page at 1280 px and at 390 px: loads without console errors, nothing overflows sideways, the main
controls are visible, and the keyboard reaches them."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl
from tests.web.conftest import PHONE
from usf_bios.web.render import SECURITY_HEADERS

PAGES = {"/": "Home", "/jobs": "Jobs", "/jobs/new": "New job", "/datasets": "Datasets", "/models": "Models",
         "/compare": "Compare runs", "/chat": "Chat", "/keys": "API keys"}


@pytest.fixture
def finished(server, tiny_model_template, tmp_path):
    """A server with a model, a dataset and one completed job; (server, job id, dataset id)."""
    with server.client() as client:
        register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
        dataset = upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
        job = submit(client, job_spec("tiny", "chat", max_steps=3))
        assert wait_for(client, job["id"], final)["status"] == "completed"
    return server, job["id"], dataset["id"]


def tab_to(page, selector: str, limit: int = 120) -> int:
    """Press Tab from the top of the page until ``selector`` has the focus; how many presses it took."""
    page.locator("body").focus()
    for presses in range(1, limit + 1):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement === document.querySelector(s)", selector):
            return presses
    raise AssertionError(f"{selector} never got the keyboard focus in {limit} tabs")


def no_sideways_scroll(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"{page.url}: {width}px wide in a {page.viewport_size['width']}px window"


def test_every_page_at_desktop_width(finished, open_page):
    server, job_id, dataset_id = finished
    page = open_page(server.url)
    for path, title in {**PAGES, f"/jobs/{job_id}": "api-job", f"/datasets/{dataset_id}": "chat"}.items():
        page.goto(path)
        expect(page.locator("h1")).to_have_text(title)
        expect(page).to_have_title(f"{title} · USF BIOS")
        no_sideways_scroll(page)
    page.goto("/datasets")
    expect(page.locator('nav a[aria-current="page"]')).to_have_text("Datasets")
    expect(page.locator('nav a[href="/keys"]')).to_have_count(0)    # keys are for servers that require them


def test_phone_width_keeps_the_main_controls_visible(finished, open_page):
    server, job_id, dataset_id = finished
    page = open_page(server.url, PHONE)
    checks = {"/": ["#new-job", 'nav a[href="/datasets"]', "#active-jobs"],
              "/jobs/new": ["#f-name", "#f-base-model", "#preset-any_lora-quick", "#start-job", "#est-time"],
              "/datasets": ["#upload-file", "#upload-submit"],
              "/models": ["#scan-models", "#register-submit"],
              f"/jobs/{job_id}": ["#download-adapter", "#loss-chart canvas", "#job-progress", "#snippet"],
              f"/datasets/{dataset_id}": ["#train-link", "#max-seq-length", "#preview .conversation >> nth=0"],
              f"/compare?jobs={job_id}": ["#job-picker input", "#compare-chart canvas"],
              f"/chat?model={job_id}": ["#chat-models input >> nth=0", "#chat-prompt", "#chat-send"]}
    for path, selectors in checks.items():
        page.goto(path)
        for selector in selectors:
            control = page.locator(selector)
            control.scroll_into_view_if_needed()
            expect(control).to_be_visible()
            box = control.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 0.5, (path, selector, box)
        no_sideways_scroll(page)
    page.goto("/jobs/new")
    page.locator("#start-job").scroll_into_view_if_needed()
    expect(page.locator("#start-job")).to_be_in_viewport()


def test_keyboard_reaches_the_main_buttons(finished, open_page):
    server, job_id, _ = finished
    page = open_page(server.url)
    page.goto("/")
    tab_to(page, "#new-job")
    page.keyboard.press("Enter")
    page.wait_for_url("**/jobs/new")
    expect(page.locator("#estimate")).to_have_attribute("data-ready", "true")
    tab_to(page, "#preset-any_lora")
    page.keyboard.press("ArrowRight")            # the presets are one radio group
    expect(page.locator("#preset-any_lora-quick")).to_be_checked()
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_value("8")
    tab_to(page, "#f-qlora")
    page.keyboard.press("Space")
    expect(page.locator("#f-hyperparameters-quantization")).to_be_enabled()
    tab_to(page, "#start-job")
    page.goto("/datasets")
    tab_to(page, "#upload-file")
    tab_to(page, "#upload-submit")
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#download-adapter")).to_be_visible()
    tab_to(page, "#download-adapter")
    tab_to(page, "#copy-snippet")
    page.goto("/models")
    tab_to(page, "#scan-models")


def test_pages_and_fragments_carry_the_security_headers(server):
    for path in ("/", "/jobs/new", "/ui/jobs?view=active", "/ui/system", "/ui/datasets", "/ui/models", "/ui/keys"):
        response = httpx.get(server.url + path)
        assert response.status_code == 200, path
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (path, name)
