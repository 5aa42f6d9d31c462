"""Datasets in the browser: upload with a progress bar, stats, histogram, truncation, preview; a broken file."""

from __future__ import annotations

import json

from playwright.sync_api import expect

from tests.api.flows import register_model, tiny_model_in
from tests.conftest import chat_rows, write_jsonl

MARKUP = '<img src=x id="injected"> <b>not bold</b>'


def test_upload_shows_format_rows_histogram_truncation_and_preview(server, page, tiny_model_template, tmp_path):
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    rows = [{"messages": [{"role": "user", "content": MARKUP}, {"role": "assistant", "content": "Shown as text."}]},
            *chat_rows(29)]
    path = write_jsonl(tmp_path / "support.jsonl", rows)

    page.goto("/datasets")
    expect(page.locator("#datasets-table")).to_contain_text("No datasets yet")
    page.set_input_files("#upload-file", str(path))
    page.fill("#upload-name", "support chats")
    page.click("#upload-submit")
    page.wait_for_url("**/datasets/*")
    expect(page.locator("#dataset-name")).to_have_text("support chats")
    expect(page.locator("#upload-bar")).to_have_count(0)        # on the dataset's own page now
    expect(page.locator("#stat-format")).to_have_text("messages")
    expect(page.locator("#stat-rows")).to_have_text("30")

    bars = page.locator("#histogram .bar")
    expect(bars.first).to_be_attached()
    assert sum(int(b.get_attribute("data-count")) for b in bars.all()) == 30
    expect(page.locator("#truncated-count")).to_have_text("0")   # nothing is near 2048 tokens

    short = client.get("/datasets/support chats", params={"max_seq_length": 40}).json()["token_stats"]
    assert 0 < short["truncated"] < 30
    page.fill("#max-seq-length", "40")
    expect(page.locator("#truncated-count")).to_have_text(str(short["truncated"]))
    expect(page.locator("#truncation")).to_contain_text("of 30 rows")
    assert page.locator("#histogram .bar.over").count() > 0

    conversations = page.locator("#preview .conversation")
    expect(conversations).to_have_count(5)
    first = conversations.first
    expect(first.locator(".bubble.user")).to_have_text("user" + MARKUP)       # the role label, then the text as typed
    expect(first.locator(".bubble.assistant")).to_have_text("assistantShown as text.")
    assert page.locator("#injected").count() == 0 and first.locator("b").count() == 0
    expect(conversations.nth(1).locator(".bubble.system")).to_have_text("systemAnswer briefly.")

    page.goto("/datasets")
    expect(page.locator("#datasets-table")).to_contain_text("support chats")
    expect(page.locator("#datasets-table")).to_contain_text("30")


def test_a_broken_file_shows_its_line_and_reason_and_nothing_is_registered(server, page, console, tmp_path):
    console.allow(r"status of 422")   # the upload's answer, shown on the page
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path.write_text(f"{good}\n{good}\n{{\"messages\": [oops\n", encoding="utf-8")

    page.goto("/datasets")
    page.set_input_files("#upload-file", str(path))
    page.click("#upload-submit")
    expect(page.locator("#upload-error")).to_be_visible()
    expect(page.locator("#upload-error-line")).to_have_text("broken.jsonl, line 3")
    expect(page.locator("#upload-error-reason")).to_contain_text("malformed JSON")
    assert page.url.endswith("/datasets")
    assert server.client().get("/datasets").json() == []
    assert console.errors, "the console listener saw the 422, so it would see an unexpected error too"
