"""The job page's actions in Chromium: Cancel and Delete each ask for a second click, Resume only where resuming
can help, no adapter snippet without an adapter, Edit & rerun prefills the form from the job's spec (issue 18,
item 8)."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.api.flows import final, job_spec, submit, wait_for
from tests.web.test_jobs import ready_server


def test_cancel_asks_twice_then_resume_and_delete(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path)
    job = submit(client, job_spec("tiny", "chat", name="long", max_steps=100_000, save_steps=100_000))
    page.goto(f"/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_text(re.compile("queued|preparing|running"))
    cancel = page.locator("#cancel-job")
    cancel.click()
    expect(cancel).to_have_text("Confirm cancel")
    assert client.get(f"/jobs/{job['id']}").json()["status"] in ("queued", "preparing", "running")   # not yet
    cancel.click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#resume-job")).to_be_visible()                # a cancelled job can continue
    expect(page.locator("#use-adapter")).to_be_hidden()
    expect(page.locator("#no-adapter")).to_have_text("No adapter: the job was cancelled before it finished.")
    expect(page.locator("#download-adapter")).to_be_hidden()

    delete = page.locator("#delete-job")
    expect(delete).to_be_visible()
    delete.click()
    expect(delete).to_have_text(re.compile("^Confirm delete"))
    assert client.get(f"/jobs/{job['id']}").status_code == 200        # one click deletes nothing
    delete.click()
    page.wait_for_url("**/jobs")
    assert client.get(f"/jobs/{job['id']}").status_code == 404
    assert not (server.home / "data" / "output" / job["id"]).exists()


def test_a_failed_setup_offers_edit_and_rerun_not_resume(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path)
    weights = server.home / "models" / "test--tiny" / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()                    # registered while whole; the engine finds no weights in setup
    spec = job_spec("tiny", "chat", name="broken", max_steps=3, lora_r=4, learning_rate=5e-4)
    spec["hyperparameters"]["target_modules"] = ["q_proj", "v_proj"]
    spec["gpu_config"] = {"num_gpus": 0}
    job = submit(client, spec)
    assert wait_for(client, job["id"], final)["status"] == "failed"
    page.goto(f"/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_text("failed")
    expect(page.locator("#job-error")).to_contain_text("no weights")
    expect(page.locator("#resume-job")).to_be_hidden()                 # it would fail the same way
    expect(page.locator("#use-adapter")).to_be_hidden()
    expect(page.locator("#copy-snippet")).to_be_hidden()
    expect(page.locator("#no-adapter")).to_have_text("No adapter: the job failed before it finished.")

    weights.write_bytes(kept)            # fixed; rerun from the same spec
    page.click("#rerun-job")
    page.wait_for_url(f"**/jobs/new?from={job['id']}")
    expect(page.locator("#preset-summary")).to_contain_text(f"Prefilled from job {job['id']}")
    expect(page.locator("#f-name")).to_have_value("broken")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_value("4")
    expect(page.locator("#f-hyperparameters-learning-rate")).to_have_value("0.0005")
    expect(page.locator("#f-hyperparameters-max-steps")).to_have_value("3")
    expect(page.locator("#f-hyperparameters-target-modules")).to_have_value("q_proj, v_proj")
    expect(page.locator("#f-base-model option:checked")).to_have_text("tiny")
    expect(page.locator("#f-dataset option:checked")).to_have_text("chat")
    expect(page.locator('input[name="preset"]:checked')).to_have_count(0)   # no preset was laid over it
    expect(page.locator("#estimate")).to_have_attribute("data-ready", "true")
    page.click("#start-job")
    page.wait_for_url(re.compile(r"/jobs/broken-"))
    rerun = page.url.rsplit("/", 1)[1]
    assert rerun != job["id"]
    first, second = client.get(f"/jobs/{job['id']}").json(), client.get(f"/jobs/{rerun}").json()
    picked = ("base_model", "dataset")      # the form sends the picked entries by id, the first submit by name
    assert {k: v for k, v in second["spec"].items() if k not in picked} == \
        {k: v for k, v in first["spec"].items() if k not in picked}
    assert (second["model_id"], second["dataset_id"]) == (first["model_id"], first["dataset_id"])
    expect(page.locator("#job-status")).to_have_text("completed", timeout=120_000)
    expect(page.locator("#use-adapter")).to_be_visible()
    expect(page.locator("#no-adapter")).to_be_hidden()
    # the snippet's long base-model path wraps inside the box instead of being cut off
    snippet = page.locator("#snippet")
    expect(snippet).to_contain_text(str(server.home / "models" / "test--tiny"))
    assert snippet.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
    assert snippet.evaluate("e => e.scrollWidth <= e.clientWidth"), "the snippet scrolls sideways"
    # and the vLLM line for the same adapter, checked against vLLM's loader rules by the server
    served = client.get(f"/jobs/{rerun}/vllm").json()
    assert served["compatible"] and served["problems"] == []
    expect(page.locator("#vllm-command")).to_have_text(served["command"])
    assert served["command"].startswith(f"vllm serve {server.home / 'models' / 'test--tiny'} --enable-lora "
                                        f"--lora-modules ft:tiny:broken:{rerun}=")
    assert client.get(f"/jobs/{job['id']}/vllm").status_code == 409      # the failed one has no adapter
