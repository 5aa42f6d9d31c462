"""Jobs in the browser on tiny models: the new-job form with presets and a live estimate, a job followed to
completion from the home page, two runs compared, a run followed across a server restart."""

from __future__ import annotations

import os
import re
import signal

from playwright.sync_api import expect

from tests.api import test_restart
from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl
from tests.web.conftest import engine_paused


def ready_server(server, template, tmp_path, rows: int = 40):
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(rows)), name="chat")
    return client


def test_new_job_presets_live_estimate_field_errors_and_start(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path)
    page.goto("/")
    page.click("#new-job")
    page.wait_for_url("**/jobs/new")
    # the only model and dataset are chosen, a name is suggested, and an estimate appears
    expect(page.locator("#f-base-model option:checked")).to_have_text("tiny")
    expect(page.locator("#f-dataset option:checked")).to_have_text("chat")
    expect(page.locator("#f-name")).to_have_value("chat-lora")
    expect(page.locator("#estimate")).to_have_attribute("data-ready", "true")
    # this host has no GPU: the form starts on the CPU, and the estimate says which device it assumes
    expect(page.locator("#f-gpu-config-num-gpus")).to_have_value("0")
    expect(page.locator("#est-device")).to_have_text("the CPU")
    expect(page.locator("#est-warning")).to_be_empty()

    # every field has its help text and the spec's bounds
    rank = page.locator('[data-path="hyperparameters.lora_r"]')
    expect(rank.locator(".bounds")).to_have_text("1 – 1 024")
    expect(rank.locator(".help")).to_have_text("LoRA rank.")
    expect(page.locator('[data-path="hyperparameters.learning_rate"] .bounds')).to_have_text("> 0, ≤ 1")

    # presets fill the hyperparameters
    page.check("#preset-any_lora-quick")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_value("8")
    expect(page.locator("#f-hyperparameters-num-epochs")).to_have_value("1")
    # the fields a preset set are marked and named; a field it leaves alone is not marked
    expect(page.locator('[data-path="hyperparameters.lora_r"]')).to_have_attribute("data-preset", "any_lora-quick")
    expect(page.locator('[data-path="hyperparameters.seed"]')).not_to_have_attribute("data-preset", re.compile(".*"))
    expect(page.locator("#preset-summary")).to_contain_text(re.compile(r"Sets [a-z_, ]*lora_r"))
    page.check("#preset-any_lora-thorough")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_value("32")
    expect(page.locator("#preset-summary")).to_contain_text("Five epochs")

    # the estimate follows the fields: steps and time, peak GPU memory once a GPU is asked for, QLoRA
    page.fill("#f-hyperparameters-max-steps", "7")
    expect(page.locator("#est-steps")).to_have_text("7")
    seven = page.locator("#est-tokens").inner_text()
    page.fill("#f-hyperparameters-max-steps", "700")
    expect(page.locator("#est-steps")).to_have_text("700")
    expect(page.locator("#est-tokens")).not_to_have_text(seven)
    page.fill("#f-hyperparameters-max-steps", "7")
    page.fill("#f-gpu-config-num-gpus", "0")
    expect(page.locator("#est-vram")).to_have_text("— (CPU)")
    expect(page.locator("#est-batch")).to_have_text(re.compile(r"^\d+ rows$"))   # batch × accumulation × 1 rank
    page.fill("#f-gpu-config-num-gpus", "1")
    expect(page.locator("#est-vram")).to_have_text(re.compile(r"^\d+\.\d\d GB$"))
    # a GPU on this GPU-less host: estimated (for planning) on the device it names, refused beside the field
    expect(page.locator("#est-device")).to_have_text("1 × GPU of type 'any', sized as an H100 80GB")
    expect(page.locator("#est-warning")).to_contain_text("A submit would be refused here: gpu_config.num_gpus")
    expect(page.locator("#f-gpu-config-num-gpus-error")).to_have_text("this server has no GPU; set 0 to train on the CPU")
    expect(page.locator("#est-cost")).to_have_text(re.compile(r"^(\$\d+\.\d\d|< \$0\.01) at \$2\.5/GPU-h$"))
    one_gpu = page.locator("#est-batch").inner_text()
    page.fill("#f-gpu-config-num-gpus", "2")   # the global batch doubles, the ranks keep a whole model each
    expect(page.locator("#est-batch")).to_have_text(f"{2 * int(one_gpu.split()[0])} rows (DDP)")
    expect(page.locator("#est-device")).to_have_text("2 × GPU of type 'any', sized as an H100 80GB")
    page.fill("#f-gpu-config-num-gpus", "1")
    expect(page.locator("#est-device")).to_have_text("1 × GPU of type 'any', sized as an H100 80GB")
    with page.expect_request(lambda r: r.url.endswith("/api/jobs/estimate")
                             and r.post_data_json["hyperparameters"]["quantization"] == "4bit"):
        page.check("#f-qlora")
    expect(page.locator("#f-hyperparameters-quantization")).to_be_enabled()
    page.uncheck("#f-qlora")
    expect(page.locator("#f-hyperparameters-quantization")).to_be_disabled()

    # an out-of-bounds value is refused beside its field, before anything is sent
    page.fill("#f-hyperparameters-lora-r", "0")
    expect(page.locator("#f-hyperparameters-lora-r-error")).to_have_text("must be ≥ 1")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#estimate-state")).to_contain_text("Fix the highlighted fields")
    expect(page.locator("#estimate")).to_have_class(re.compile(r"\bstale\b"))   # the figures shown no longer apply
    page.fill("#f-name", "has space")
    expect(page.locator("#f-name-error")).to_contain_text("letters, digits")
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" and r.url.endswith("/api/jobs") else None)
    page.click("#start-job")
    expect(page.locator("#f-name")).to_be_focused()          # the first field at fault takes the focus
    expect(page.locator("#f-name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_attribute("aria-invalid", "true")
    assert sent == [] and client.get("/jobs").json()["items"] == []    # refused in the page: nothing sent
    page.fill("#f-hyperparameters-lora-r", "4")
    page.fill("#f-name", "from-the-form")
    expect(page.locator("#f-hyperparameters-lora-r-error")).to_be_empty()
    expect(page.locator("#estimate")).not_to_have_class(re.compile(r"\bstale\b"))   # a new estimate came

    # a field in "All hyperparameters" opens the section when it is at fault
    page.fill("#f-hyperparameters-max-seq-length", "128")
    page.click("#advanced summary")
    page.fill("#f-hyperparameters-val-split", "0.9")
    expect(page.locator("#f-hyperparameters-val-split-error")).to_have_text("must be ≤ 0.5")
    page.fill("#f-hyperparameters-val-split", "0.1")
    page.fill("#f-hyperparameters-eval-steps", "3")
    page.select_option("#f-hyperparameters-precision", "fp32")
    page.uncheck("#f-hyperparameters-gradient-checkpointing")
    page.fill("#f-gpu-config-num-gpus", "0")

    page.click("#start-job")
    page.wait_for_url(re.compile(r"/jobs/from-the-form-"))
    job_id = page.url.rsplit("/", 1)[1]
    sent = client.get(f"/jobs/{job_id}").json()["spec"]
    assert sent["hyperparameters"]["max_steps"] == 7 and sent["hyperparameters"]["lora_r"] == 4
    assert sent["hyperparameters"]["learning_rate"] == 1e-4 and sent["hyperparameters"]["quantization"] == "none"
    assert sent["gpu_config"] == {"num_gpus": 0, "gpu_type": "any", "executor": "default", "strategy": "auto",
                                  "num_processes": None, "num_nodes": 1}
    expect(page.locator("#job-status")).to_have_text("completed", timeout=120_000)
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "7")
    expect(page.locator("#loss-chart")).to_have_attribute("data-val-points", "3")   # steps 3, 6 and the end
    expect(page.locator("#download-adapter")).to_be_visible()


def test_home_lists_a_running_job_then_it_finishes(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path)
    page.goto("/")
    expect(page.locator("#active-jobs")).to_contain_text("No job is running or queued")
    expect(page.locator("#disk-free")).to_have_text(re.compile(r"^\d+\.\d GB free$"))
    expect(page.locator("#system")).to_contain_text("No GPU found")   # this host has none
    job = submit(client, job_spec("tiny", "chat", name="homepage", max_steps=40))
    row = page.locator(f'#active-jobs tr[data-job-id="{job["id"]}"]')
    with engine_paused(server.home, job["id"]) as step:    # held mid-run while the list (every 3 s) shows it
        expect(row.locator(".badge")).to_have_text("running")
        expect(row).to_contain_text(f"step {step} / 40")
        expect(row.locator("progress")).to_be_attached()
    wait_for(client, job["id"], final)
    expect(row).to_have_count(0, timeout=15_000)
    finished = page.locator(f'#recent-jobs tr[data-job-id="{job["id"]}"]')
    expect(finished.locator(".badge")).to_have_text("completed", timeout=15_000)
    expect(finished).to_contain_text("step 40 / 40")
    finished.locator("a.job-link").click()
    page.wait_for_url(f"**/jobs/{job['id']}")
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "40")


def test_compare_two_runs(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path)
    slow = submit(client, job_spec("tiny", "chat", name="lr-low", max_steps=8, learning_rate=1e-3))
    fast = submit(client, job_spec("tiny", "chat", name="lr-high", max_steps=8, learning_rate=5e-3))
    for job in (slow, fast):
        assert wait_for(client, job["id"], final)["status"] == "completed"

    page.goto("/jobs")
    for job in (slow, fast):
        page.locator(f'#jobs-table input[value="{job["id"]}"]').check()
    expect(page.locator("#compare-selected")).to_have_text("Compare 2 jobs")
    page.click("#compare-selected")
    page.wait_for_url(re.compile(r"/compare\?jobs="))
    chart = page.locator("#compare-chart")
    expect(chart).to_have_attribute("data-series", "2")
    expect(chart.locator("canvas")).to_be_visible()
    legend = chart.locator(".u-legend")
    expect(legend).to_contain_text("lr-low loss")
    expect(legend).to_contain_text("lr-high loss")

    table = page.locator("#compare-table")
    expect(table.locator('tr[data-key="hyperparameters.learning_rate"]')).to_have_class("differs")
    expect(table.locator('tr[data-key="hyperparameters.learning_rate"] td')).to_have_count(2)
    assert sorted(table.locator('tr[data-key="hyperparameters.learning_rate"] td').all_inner_texts()) == ["0.001", "0.005"]
    expect(table.locator('tr[data-key="hyperparameters.lora_r"]')).to_have_class("same")
    expect(table.locator('tr[data-key="final loss"] td').first).not_to_have_text("—")
    page.check("#only-diff")
    expect(table.locator('tr[data-key="hyperparameters.lora_r"]')).to_be_hidden()
    expect(table.locator('tr[data-key="hyperparameters.learning_rate"]')).to_be_visible()

    # dropping one run from the picker updates the chart and the address
    page.locator(f'#job-picker input[value="{fast["id"]}"]').uncheck()
    expect(chart).to_have_attribute("data-series", "1")
    assert fast["id"] not in page.url and slow["id"] in page.url


def test_the_chart_follows_a_job_across_a_server_restart(make_server, open_page, console, tiny_model_template, tmp_path):
    console.allow(r"net::ERR_|Failed to fetch")   # the page's requests while no server listens
    first = make_server().start()
    client = ready_server(first, tiny_model_template, tmp_path)
    steps = 200
    job = submit(client, job_spec("tiny", "chat", name="restarted", max_steps=steps, save_steps=50, eval_steps=100))
    page = open_page(first.url)
    streams = []                     # every request for the event stream, in order
    page.on("request", lambda r: streams.append(r) if r.url.endswith(f"/api/jobs/{job['id']}/events") else None)
    page.goto(f"/jobs/{job['id']}")
    chart = page.locator("#loss-chart")
    expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]\d|\d{3})$"), timeout=120_000)   # ≥ 20
    expect(page.locator("#live")).to_be_visible()
    assert len(streams) == 1 and "last-event-id" not in streams[0].headers    # the first one reads from the start

    # the engine runs on in its own session; it is paused meanwhile so the restart is surely mid-run
    [engine] = test_restart.engine_pids(job["id"])
    os.kill(engine, signal.SIGSTOP)
    try:
        first.stop(signal.SIGKILL)
        expect(page.locator("#live")).to_be_hidden()
        stalled = int(chart.get_attribute("data-points"))
        last_seen = page.locator("#job").get_attribute("data-last-event-id")
        second = make_server()
        second.port = first.port
        second.start()
        with second.client() as client:
            assert client.get(f"/jobs/{job['id']}").json()["status"] == "running"
        expect(page.locator("#live")).to_be_visible()   # reconnected while the engine is still paused: no race
    finally:
        os.kill(engine, signal.SIGCONT)
    with second.client() as client:
        # every try since the drop, the one that got through included, asks for what follows the last event seen
        retries = streams[1:]
        assert retries and last_seen and {r.headers.get("last-event-id") for r in retries} == {last_seen}
        expect(page.locator("#job-status")).to_have_text("completed", timeout=180_000)
        assert client.get(f"/jobs/{job['id']}").json()["attempts"] == 1     # followed again, not restarted
    expect(chart).to_have_attribute("data-points", str(steps))
    expect(chart).to_have_attribute("data-first-step", "1")
    expect(chart).to_have_attribute("data-last-step", str(steps))
    expect(page.locator("#job")).to_have_attribute("data-metric-events", str(steps))   # none sent twice
    assert stalled < steps
