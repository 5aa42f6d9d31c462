"""A submit is refused with a 422 naming the field when the scheduler could not run the job on this server (a GPU
asked for on a host without one), before anything is queued; the estimate still answers, says which device it
assumes and what a submit would be refused for (issue 18, items 3 and 5)."""

from __future__ import annotations

from tests.api.flows import job_spec, register_model, tiny_model_in, upload_dataset
from tests.conftest import chat_rows, write_jsonl
from usf_bios.control.gpus import list_gpus


def _ready(local_app, tiny_model_template, tmp_path):
    client = local_app.client
    register_model(client, "tiny", tiny_model_in(local_app.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    return client


def test_a_gpu_job_on_a_host_without_one_is_refused_before_it_is_queued(local_app, tiny_model_template, tmp_path):
    assert list_gpus() == []          # this test describes a host without a GPU
    client = _ready(local_app, tiny_model_template, tmp_path)
    spec = {**job_spec("tiny", "chat"), "gpu_config": {"num_gpus": 1, "gpu_type": "H100"}}
    refused = client.post("/jobs", json=spec)
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["errors"]
    assert error["field"] == "gpu_config.num_gpus"
    assert error["message"].startswith("the job asks for 1 GPU and this host has no GPU; set gpu_config.num_gpus: 0")
    assert client.get("/jobs").json()["total"] == 0
    assert list((local_app.home / "data" / "output").iterdir()) == []

    estimate = client.post("/jobs/estimate", json=spec)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["device"] == "1 × H100"
    assert estimate.json()["warning"] == f"a submit would be refused here: gpu_config.num_gpus: {error['message']}"
    any_gpu = client.post("/jobs/estimate", json={**spec, "gpu_config": {"num_gpus": 1}}).json()
    assert any_gpu["device"] == "1 × GPU of type 'any', sized as an H100 80GB"


def test_a_cpu_job_estimates_without_a_warning_and_is_queued(local_app, tiny_model_template, tmp_path):
    client = _ready(local_app, tiny_model_template, tmp_path)
    spec = {**job_spec("tiny", "chat"), "gpu_config": {"num_gpus": 0}}
    estimate = client.post("/jobs/estimate", json=spec).json()
    assert estimate["device"] == "the CPU" and estimate["warning"] is None
    created = client.post("/jobs", json=spec)
    assert created.status_code == 201, created.text
    assert client.get("/jobs").json()["total"] == 1
