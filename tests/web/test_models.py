"""Models in the browser: register a folder, a refused folder with its reason, scan the model folders, download
from the Hugging Face Hub or ModelScope."""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import expect

from tests.api.flows import tiny_model_in


def test_register_a_folder_see_its_facts_refusals_and_scan(server, page, console, tiny_model_template, tmp_path):
    first = tiny_model_in(server.home, tiny_model_template, name="org--first")
    page.goto("/models")
    expect(page.locator("#models-table")).to_contain_text("No models registered")

    page.fill("#model-name", "first")
    page.fill("#model-path", str(first))
    page.click("#register-submit")
    row = page.locator('#models-table tr[data-model-name="first"]')
    expect(row).to_be_visible()
    facts = server.client().get("/models/first").json()
    expect(row.locator("[data-parameters]")).to_have_attribute("data-parameters", str(facts["parameters"]))
    expect(row).to_contain_text("folder")
    expect(row).to_contain_text("llama")
    expect(row.locator(".badge")).to_have_text("valid")
    expect(page.locator("#model-name")).to_have_value("")

    # a required field left empty, and a folder outside the allowed roots: each answered beside the form
    page.click("#register-submit")
    expect(page.locator("#model-name-error")).to_have_text("required")
    console.allow(r"status of 403")
    elsewhere = shutil.copytree(tiny_model_template, tmp_path / "elsewhere" / "model")
    page.fill("#model-name", "outside")
    page.fill("#model-path", str(elsewhere))
    page.click("#register-submit")
    expect(page.locator("#register-error")).to_contain_text("outside the folders models may be registered from")
    assert [m["name"] for m in server.client().get("/models").json()] == ["first"]

    # a cache entry needs org/name: the field switches with the source
    page.select_option("#model-source", "huggingface")
    expect(page.locator("#model-repo")).to_be_visible()
    expect(page.locator("#model-path")).to_be_hidden()
    page.select_option("#model-source", "local")

    tiny_model_in(server.home, tiny_model_template, name="org--second")
    page.click("#scan-models")
    expect(page.locator("#scan-result")).to_contain_text("Registered org--second.")
    expect(page.locator("#scan-result details")).to_contain_text("1 folder(s) skipped")
    expect(page.locator('#models-table tr[data-model-name="org--second"]')).to_be_visible()


def pull_org_tiny(page):
    """Download org/tiny from the page's form, watching the progress bar run to its end; its row in the table."""
    page.fill("#pull-repo", "org/tiny")
    page.click("#pull-submit")
    expect(page.locator("#pull-progress")).to_be_visible()
    expect(page.locator("#pull-text")).to_contain_text("org/tiny: ")
    expect(page.locator("#toast")).to_contain_text("Downloaded and registered org/tiny", timeout=120_000)
    bar = page.locator("#pull-bar")
    row = page.locator('#models-table tr[data-model-name="org/tiny"]')
    expect(row).to_have_count(1)
    assert bar.get_attribute("value") == bar.get_attribute("max") != "1"
    return row


def test_download_a_model_from_the_hub_with_its_progress(make_server, open_page, console, tiny_model_template):
    from tests.models.fake_hub import FakeHub

    hub = FakeHub()
    hub.add("org/tiny", tiny_model_template)
    hub.delay_s = 0.3
    hub.start()
    try:
        server = make_server(HF_ENDPOINT=hub.url).start()
        page = open_page(server.url)
        page.goto("/models")
        page.click("#pull-submit")
        expect(page.locator("#pull-repo-error")).to_have_text("required")
        console.allow(r"status of 422")
        page.fill("#pull-repo", "not a repo")
        page.click("#pull-submit")
        expect(page.locator("#pull-repo-error")).to_contain_text("must be org/name")
        expect(pull_org_tiny(page)).to_be_visible()
    finally:
        hub.stop()

    off = make_server(SUPPORTED_MODEL_SOURCES="local").start()
    page = open_page(off.url)
    page.goto("/models")
    expect(page.locator("#pull-disabled")).to_contain_text("huggingface is not in SUPPORTED_MODEL_SOURCES")
    expect(page.locator("#pull-form")).to_have_count(0)


def test_download_a_model_from_modelscope_with_its_progress(make_server, open_page, tiny_model_template, tmp_path):
    pytest.importorskip("modelscope")
    from tests.models.fake_hub import FakeModelScope

    hub = FakeModelScope()
    hub.add("org/tiny", tiny_model_template)
    hub.delay_s = 0.3
    hub.start()
    try:
        server = make_server(MODELSCOPE_ENDPOINT=hub.url, MODELSCOPE_HOME=str(tmp_path / "modelscope-home")).start()
        page = open_page(server.url)
        page.goto("/models")
        expect(page.locator("#pull-revision")).to_have_attribute("placeholder", "main")
        page.select_option("#pull-source", "modelscope")
        expect(page.locator("#pull-revision")).to_have_attribute("placeholder", "master")
        expect(pull_org_tiny(page)).to_contain_text("ModelScope")
    finally:
        hub.stop()

    off = make_server(SUPPORTED_MODEL_SOURCES="local,huggingface").start()
    page = open_page(off.url)
    page.goto("/models")
    expect(page.locator("#pull-source option")).to_have_count(1)
    expect(page.locator("#pull-source-help")).to_contain_text(
        "ModelScope is off: modelscope is not in SUPPORTED_MODEL_SOURCES (local,huggingface)")
