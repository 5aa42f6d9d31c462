"""Compare names the model and dataset (the form submits their ids) and shows which preset a run matches, with
the cells that preset set tagged (issue 18, item 7)."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.api.flows import final, job_spec, submit, wait_for
from tests.web.test_jobs import ready_server
from usf_bios.presets import get_preset


def test_compare_shows_names_and_the_matching_preset(server, page, tiny_model_template, tmp_path):
    client = ready_server(server, tiny_model_template, tmp_path, rows=12)
    model, dataset = client.get("/models/tiny").json(), client.get("/datasets/chat").json()
    quick = get_preset("any_lora-quick")
    by_ids = submit(client, {"name": "quick-run", "base_model": model["id"], "dataset": dataset["id"],
                             "hyperparameters": {**quick.fields["hyperparameters"], "precision": "fp32"},
                             "gpu_config": {"num_gpus": 0}})
    by_names = submit(client, job_spec("tiny", "chat", name="own-run", max_steps=2))
    for job in (by_ids, by_names):
        assert wait_for(client, job["id"], final)["status"] == "completed"
    assert client.get(f"/jobs/{by_ids['id']}").json()["spec"]["base_model"] == model["id"]   # an id, as the form sends

    page.goto(f"/compare?jobs={by_ids['id']}&jobs={by_names['id']}")
    table = page.locator("#compare-table")
    expect(table.locator('tr[data-key="base_model"] td')).to_have_text(["tiny", "tiny"])
    expect(table.locator('tr[data-key="base_model"]')).to_have_class("same")
    expect(table.locator('tr[data-key="dataset"] td')).to_have_text(["chat", "chat"])
    expect(table.locator('tr[data-key="preset"] td')).to_have_text(["Quick", "—"])
    rank = table.locator('tr[data-key="hyperparameters.lora_r"] td')
    expect(rank.nth(0)).to_have_class("from-preset")
    expect(rank.nth(0)).to_have_attribute("title", "set by the preset Quick")
    expect(rank.nth(1)).not_to_have_class(re.compile("from-preset"))
    expect(table.locator('tr[data-key="hyperparameters.seed"] td').nth(0)).not_to_have_class(re.compile("from-preset"))
    assert model["id"] not in table.inner_text() and dataset["id"] not in table.inner_text()
