"""The whole loop in the browser on the real SmolLM2-135M-Instruct (CPU, about 2 minutes): fill the new-job
form, watch the loss chart gain points over SSE, reload mid-run and still see the whole curve, download
the adapter and run the page's peft snippet on it."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import time

import pytest
from playwright.sync_api import expect

from tests.api.flows import register_model, upload_dataset, wait_for
from tests.web.conftest import engine_paused
from usf_bios import demo
from usf_bios.models.gguf import SMOLLM2_NAME, smollm2_gguf

pytestmark = pytest.mark.slow
STEPS = 12


def chart_points(page) -> tuple[int, int | None, int | None]:
    chart = page.locator("#loss-chart")
    first, last = chart.get_attribute("data-first-step"), chart.get_attribute("data-last-step")
    return int(chart.get_attribute("data-points")), int(first) if first else None, int(last) if last else None


def test_train_smollm2_from_the_form_follow_reload_and_download(server, open_page, tmp_path):
    imported = server.cli("models", "import-gguf", str(smollm2_gguf()), "--name", SMOLLM2_NAME)
    assert imported.returncode == 0, imported.stderr
    client = server.client()
    model = register_model(client, "smollm2", server.home / "models" / SMOLLM2_NAME)
    upload_dataset(client, demo.write_fact_dataset(tmp_path / "velmora.jsonl"), name="velmora")

    page = open_page(server.url)
    page.goto("/jobs/new")
    expect(page.locator("#f-base-model option:checked")).to_have_text("smollm2")
    expect(page.locator("#f-dataset option:checked")).to_have_text("velmora")
    page.fill("#f-name", "velmora-web")
    for field, value in {"max-steps": STEPS, "learning-rate": "0.001", "batch-size": 4, "gradient-accumulation-steps": 1,
                         "max-seq-length": 128, "lora-r": 16, "lora-alpha": 32}.items():
        page.fill(f"#f-hyperparameters-{field}", str(value))
    page.click("#advanced summary")
    for field, value in {"lora-dropout": 0, "warmup-ratio": "0.1", "val-split": "0.25", "eval-steps": 4,
                         "save-steps": 6}.items():
        page.fill(f"#f-hyperparameters-{field}", str(value))
    page.select_option("#f-hyperparameters-precision", "fp32")
    page.uncheck("#f-hyperparameters-gradient-checkpointing")
    page.fill("#f-gpu-config-num-gpus", "0")
    expect(page.locator("#est-steps")).to_have_text(str(STEPS))
    expect(page.locator("#est-vram")).to_have_text("— (CPU)")
    page.click("#start-job")
    page.wait_for_url(re.compile(r"/jobs/velmora-web-"))
    job_id = page.url.rsplit("/", 1)[1]

    # the chart gains points while the job runs
    seen: list[int] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        points, _, _ = chart_points(page)
        if not seen or points != seen[-1]:
            seen.append(points)
        if points >= 4:
            break
        page.wait_for_timeout(200)
    assert seen[-1] >= 4 and seen == sorted(seen), seen
    expect(page.locator("#job-status")).to_have_text("running")
    expect(page.locator("#live")).to_be_visible()
    expect(page.locator("#job-eta")).to_contain_text("left")

    # a reload mid-run shows the whole curve at once from /metrics: the engine is paused once the database
    # holds every step written, and the event stream is held back, so no point can come from it
    before = chart_points(page)[0]
    stream = re.compile(rf"/api/jobs/{job_id}/events")
    held = []
    page.route(stream, lambda route: held.append(route))
    with engine_paused(server.home, job_id) as done:
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running", "the reload must happen mid-run"
        wait_for(client, job_id, lambda job: job["current_step"] == done)
        with page.expect_request(lambda r: bool(stream.search(r.url))), \
                page.expect_response(lambda r: r.url.endswith(f"/api/jobs/{job_id}/metrics")) as history:
            page.reload()                                   # the history first, then the stream (held)
        assert [p["step"] for p in history.value.json()] == list(range(1, done + 1))
        expect(page.locator("#loss-chart")).to_have_attribute("data-last-step", str(done))
        assert chart_points(page) == (done, 1, done) and done >= before, (before, done)
        while not held:
            page.wait_for_timeout(50)
        expect(page.locator("#live")).to_be_hidden()
        for route in held:
            route.continue_()
        page.unroute(stream)
        expect(page.locator("#live")).to_be_visible()

    while chart_points(page)[0] < STEPS and time.monotonic() < deadline:
        points = chart_points(page)[0]
        if points != seen[-1]:
            seen.append(points)
        page.wait_for_timeout(200)
    expect(page.locator("#job-status")).to_have_text("completed", timeout=120_000)
    assert len(set(seen)) >= 3, f"the chart should grow in several steps, saw {seen}"
    assert chart_points(page) == (STEPS, 1, STEPS)
    expect(page.locator("#loss-chart")).to_have_attribute("data-val-points", "3")      # steps 4, 8 and 12
    stored = client.get(f"/jobs/{job_id}/metrics").json()
    assert [p["step"] for p in stored] == list(range(1, STEPS + 1))
    assert abs(float(page.locator("#m-loss").inner_text()) - stored[-1]["loss"]) < 1e-4
    expect(page.locator("#checkpoint-table tbody tr")).to_have_count(1)                  # step 6
    expect(page.locator("#log")).to_contain_text("done: completed")

    # download the adapter, then run the snippet the page shows, as given, next to the extracted folder
    with page.expect_download() as download:
        page.click("#download-adapter")
    assert download.value.suggested_filename == f"{job_id}.tar"
    with tarfile.open(fileobj=io.BytesIO(download.value.path().read_bytes())) as archive:
        names = archive.getnames()
        assert f"{job_id}/adapter_model.safetensors" in names and f"{job_id}/adapter_config.json" in names
        archive.extractall(tmp_path / "unpacked", filter="data")
    snippet = page.locator("#snippet").inner_text()
    assert model["path"] in snippet and f'PeftModel.from_pretrained(base, "{job_id}")' in snippet
    check = snippet + "\nassert type(model).__name__.startswith('Peft'), type(model)\nprint('loaded')\n"
    ran = subprocess.run([sys.executable, "-c", check], cwd=tmp_path / "unpacked", capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0 and "loaded" in ran.stdout, ran.stderr[-3000:]
