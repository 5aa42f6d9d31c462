"""POST /api/jobs/{id}/export on a real server: a background merge (and GGUF) with progress, then its download."""

from __future__ import annotations

import io
import tarfile
import time

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl


def test_export_runs_in_the_background_and_downloads(make_server, tiny_model_template, tmp_path):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    key, other = server.create_key("alice"), server.create_key("bob")
    client = server.client(key)
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    job = submit(client, job_spec("tiny", "chat", max_steps=40, val_split=0.0))
    early = client.post(f"/jobs/{job['id']}/export")
    assert early.status_code == 409 and "exists once it completes" in early.json()["detail"]   # not finished yet
    assert wait_for(client, job["id"], final)["status"] == "completed"
    assert client.get(f"/jobs/{job['id']}/export").json()["state"] == "none"

    started = client.post(f"/jobs/{job['id']}/export", json={"gguf": True, "gguf_dtype": "f16"})
    assert started.status_code == 202 and started.json()["state"] in ("running", "completed")
    deadline = time.monotonic() + 300
    while (state := client.get(f"/jobs/{job['id']}/export").json())["state"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.3)
    assert state["state"] == "completed" and state["progress"] == 1.0, state
    assert [f["name"] for f in state["files"]] == ["merged/", f"{job['name']}.f16.gguf"]

    tar = client.get(f"/jobs/{job['id']}/export/download")
    assert tar.status_code == 200
    names = tarfile.open(fileobj=io.BytesIO(tar.content)).getnames()
    assert f"{job['id']}-export/merged/model.safetensors" in names
    assert f"{job['id']}-export/{job['name']}.f16.gguf" in names
    assert server.client(other).post(f"/jobs/{job['id']}/export").status_code == 404
    assert server.client(other).get(f"/jobs/{job['id']}/export/download").status_code == 404
