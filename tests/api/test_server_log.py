"""The server's log is free of warnings raised from our own code (deprecations among them) while it answers the
routes a first hour touches, the refusals included (issue 18, item 10)."""

from __future__ import annotations

import re

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl

OURS = re.compile(r"usf_bios/[\w/]+\.py:\d+: \w*Warning")


def test_no_warning_from_our_code_in_the_server_log(make_server, tiny_model_template, tmp_path):
    server = make_server(PYTHONWARNINGS="default", USF_MAX_UPLOAD_MB="1").start()   # every warning shown, once
    with server.client() as client:
        register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
        upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
        big = tmp_path / "big.jsonl"
        big.write_bytes(b'{"text": "' + b"x" * (2 << 20) + b'"}\n')
        assert client.post("/datasets", files={"file": ("big.jsonl", big.read_bytes())}).status_code == 413
        assert client.post("/datasets", files={"name": (None, "nofile")}).status_code == 422
        assert client.get("/datasets/chat", params={"model": "tiny"}).status_code == 200
        assert client.get("/datasets/chat/preview").status_code == 200
        assert client.post("/jobs/estimate", json=job_spec("tiny", "chat")).status_code == 200
        refused = {**job_spec("tiny", "chat"), "gpu_config": {"num_gpus": 1}}
        assert client.post("/jobs", json=refused).status_code == 422
        job = submit(client, job_spec("tiny", "chat", max_steps=2))
        assert wait_for(client, job["id"], final)["status"] == "completed"
        assert client.delete(f"/jobs/{job['id']}").status_code == 204
    import httpx

    for page in ("/", "/jobs/new", "/docs", "/redoc", "/openapi.json", "/compare"):
        assert httpx.get(server.url + page).status_code == 200, page
    log = (server.home / "server.log").read_text()
    assert "POST /api/datasets HTTP/1.1\" 413" in log       # the log is the one that saw those requests
    assert not OURS.findall(log), "\n".join(line for line in log.splitlines() if "Warning" in line)
