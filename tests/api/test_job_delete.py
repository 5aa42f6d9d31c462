"""DELETE /api/jobs/{id}: a final job's row, points, artifact and files go; a queued or running one is refused
until cancelled; `resumable` says when resuming can help (issue 18, item 8)."""

from __future__ import annotations

import pytest

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl


@pytest.fixture
def served(server, tiny_model_template, tmp_path):
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    yield server, client
    client.close()


def _files(home, job_id):
    data = home / "data"
    return [p for p in (data / "output" / job_id, data / "checkpoints" / job_id, data / "logs" / f"{job_id}.log",
                        data / "logs" / f"{job_id}.events.jsonl", data / "logs" / f"{job_id}.out") if p.exists()]


def test_a_completed_job_is_deleted_with_its_files(served):
    server, client = served
    job = submit(client, job_spec("tiny", "chat", max_steps=3, save_steps=2))
    done = wait_for(client, job["id"], final)
    assert done["status"] == "completed" and done["resumable"] is False
    assert len(client.get(f"/jobs/{job['id']}/metrics").json()) == 3
    assert len(_files(server.home, job["id"])) >= 4      # output, checkpoints, log, events
    other = submit(client, job_spec("tiny", "chat", name="kept", max_steps=1))
    wait_for(client, other["id"], final)

    deleted = client.delete(f"/jobs/{job['id']}")
    assert deleted.status_code == 204, deleted.text
    assert client.get(f"/jobs/{job['id']}").status_code == 404
    assert client.get(f"/jobs/{job['id']}/metrics").status_code == 404
    assert _files(server.home, job["id"]) == []
    assert [j["id"] for j in client.get("/jobs").json()["items"]] == [other["id"]]   # the other job is untouched
    assert client.get(f"/jobs/{other['id']}/download").status_code == 200
    assert client.delete(f"/jobs/{job['id']}").status_code == 404
    # the dataset the deleted job used can be deleted once no job refers to it
    assert client.delete("/jobs/" + other["id"]).status_code == 204
    assert client.delete("/datasets/chat").status_code == 204


def test_a_queued_or_running_job_must_be_cancelled_first(served):
    server, client = served
    job = submit(client, job_spec("tiny", "chat", max_steps=100_000, save_steps=100_000))
    refused = client.delete(f"/jobs/{job['id']}")
    assert refused.status_code == 409, refused.text
    assert "cancel it first" in refused.json()["detail"]
    assert client.get(f"/jobs/{job['id']}").status_code == 200
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    cancelled = wait_for(client, job["id"], final)
    assert cancelled["status"] == "cancelled" and cancelled["resumable"] is True
    assert client.delete(f"/jobs/{job['id']}").status_code == 204
    assert _files(server.home, job["id"]) == []


def test_a_job_that_failed_before_training_is_not_resumable(served):
    server, client = served
    # the registered model loses its weights after it was checked: the engine fails in setup, before any step
    (server.home / "models" / "test--tiny" / "model.safetensors").unlink()
    job = submit(client, job_spec("tiny", "chat", max_steps=2))
    failed = wait_for(client, job["id"], final)
    assert failed["status"] == "failed" and "no weights" in failed["error"], failed
    assert failed["total_steps"] is None and failed["resumable"] is False
    assert client.delete(f"/jobs/{job['id']}").status_code == 204
