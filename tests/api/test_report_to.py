"""``report_to`` through REST: a tool the server cannot use is refused before anything is queued (422 on
``report_to``), one it can is accepted and kept in the job's spec."""

from __future__ import annotations

from tests.api.flows import job_spec, register_model, tiny_model_in, upload_dataset
from tests.conftest import chat_rows, write_jsonl


def test_report_to_is_checked_before_a_job_is_queued(local_app, tiny_model_template, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = local_app.client
    register_model(client, "tiny", tiny_model_in(local_app.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    for route in ("/jobs/estimate", "/jobs"):
        refused = client.post(route, json={**job_spec("tiny", "chat"), "report_to": ["mlflow"]})
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["errors"]
        assert error["field"] == "report_to" and error["message"].startswith("mlflow needs")
    assert client.get("/jobs").json()["total"] == 0

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    accepted = client.post("/jobs", json={**job_spec("tiny", "chat"), "report_to": ["tensorboard", "mlflow"]})
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["spec"]["report_to"] == ["tensorboard", "mlflow"]
