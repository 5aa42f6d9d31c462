"""Models in the browser: register a folder, a refused folder with its reason, scan the model folders."""

from __future__ import annotations

import shutil

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
