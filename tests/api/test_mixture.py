"""A job of several registered datasets through REST: each is resolved and validated like one dataset, the spec
locks each file with its weight, the estimate samples as the engine does, and a dataset a mixture uses stays."""

from __future__ import annotations

import yaml

from tests.api.flows import job_spec, register_model, tiny_model_in, upload_dataset
from tests.conftest import chat_rows, write_jsonl


def mixture_spec(datasets: list[dict]) -> dict:
    spec = job_spec("tiny", "unused")
    spec.pop("dataset")
    return {**spec, "datasets": datasets}


def test_a_mixture_is_resolved_locked_estimated_and_protected(local_app, tiny_model_template, tmp_path):
    client = local_app.client
    register_model(client, "tiny", tiny_model_in(local_app.home, tiny_model_template))
    chat = upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)), name="chat")
    extra = upload_dataset(client, write_jsonl(tmp_path / "extra.jsonl", chat_rows(10)), name="extra")

    missing = client.post("/jobs", json=mixture_spec([{"name": "chat"}, {"name": "nope", "weight": 2}]))
    assert missing.status_code == 422
    assert missing.json()["errors"] == [{"field": "datasets.1.name",
                                         "message": "no registered dataset 'nope' (upload it with POST /api/datasets)"}]
    both = client.post("/jobs", json={**job_spec("tiny", "chat"), "datasets": [{"name": "extra"}]})
    assert both.status_code == 422 and both.json()["errors"][0]["field"] == "datasets"

    plain = client.post("/jobs/estimate", json=job_spec("tiny", "chat", max_steps=None, num_epochs=1)).json()
    mixed = client.post("/jobs/estimate", json={**mixture_spec([{"name": "chat", "weight": 2},
                                                                {"name": "extra", "weight": 0.5}]),
                                               "hyperparameters": {**job_spec("t", "d")["hyperparameters"],
                                                                   "max_steps": None, "num_epochs": 1}})
    assert mixed.status_code == 200, mixed.text
    # 30 examples in all; training takes each chat example twice and half of the extra ones
    assert mixed.json()["examples"] == 30 and plain["examples"] == 20
    assert mixed.json()["tokens_per_epoch"] > 1.5 * plain["tokens_per_epoch"]

    created = client.post("/jobs", json=mixture_spec([{"name": "chat", "weight": 2}, {"name": extra["id"], "weight": 0.5}]))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["dataset_id"] == chat["id"] and job["spec"]["datasets"][1] == {"name": extra["id"], "weight": 0.5}
    locked = yaml.safe_load((local_app.home / "data" / "output" / job["id"] / "job.yaml").read_text())
    assert locked["dataset"] is None
    assert [(d["name"].endswith(("chat.jsonl", "extra.jsonl")), d["weight"]) for d in locked["datasets"]] == \
        [(True, 2.0), (True, 0.5)]
    for dataset in (chat, extra):   # both are in use, not only the first
        refused = client.delete(f"/datasets/{dataset['id']}")
        assert refused.status_code == 409 and job["id"] in refused.json()["detail"], refused.text


def test_a_remote_job_takes_one_dataset(tmp_path, tiny_model_template, monkeypatch):
    """The worker contract sends one dataset_url: a mixture for the remote executor is refused before anything is
    queued, naming the field."""
    from fastapi.testclient import TestClient

    from usf_bios.api.main import create_app
    from usf_bios.settings import Settings

    home = tmp_path / "usf"
    settings = Settings(usf_home=home, database_url=f"sqlite:///{tmp_path / 'usf.db'}",
                        gpu_cluster_api_url="http://127.0.0.1:9", gpu_cluster_api_key="k" * 32)
    app = create_app(settings, "127.0.0.1", start_scheduler=False)
    with TestClient(app, base_url="http://127.0.0.1:8000/api") as client:
        register_model(client, "tiny", tiny_model_in(home, tiny_model_template))
        upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(8)), name="chat")
        spec = {**mixture_spec([{"name": "chat"}, {"name": "chat", "weight": 2}]),
                "gpu_config": {"num_gpus": 0, "executor": "remote"}}
        refused = client.post("/jobs", json=spec)
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["field"] == "datasets"
        assert "a remote job takes one dataset" in refused.json()["errors"][0]["message"]
        assert client.get("/jobs").json()["total"] == 0
