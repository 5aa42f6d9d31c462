"""`usf-bios submit` and the jobs client against a real server: a spec sent and followed to its end, refusals
named by field, an API key from USF_API_KEY, and an unreachable server said as such."""

from __future__ import annotations

from tests.api.flows import register_model, tiny_model_in, upload_dataset
from tests.api.test_adopt import usf
from tests.conftest import chat_rows, write_jsonl

SPEC = """name: submitted
base_model: tiny
{datasets}
gpu_config: {{num_gpus: 0}}
hyperparameters: {{max_steps: 6, batch_size: 2, gradient_accumulation_steps: 1, max_seq_length: 96, lora_r: 4,
  learning_rate: 0.003, val_split: 0.1, eval_steps: 3, save_steps: 3, precision: fp32, gradient_checkpointing: false}}
"""


def test_submit_follow_and_refusals(make_server, tiny_model_template, tmp_path):
    server = make_server().start()
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)), name="chat")
    upload_dataset(client, write_jsonl(tmp_path / "more.jsonl", chat_rows(10)), name="more")
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(datasets="datasets: [{name: chat, weight: 1.5}, {name: more}]"))

    sent = usf(server, "submit", str(spec), "--follow")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    job_id = sent.stdout.split()[1]
    assert "step 6/6" in sent.stdout and "validation_loss" in sent.stdout and "completed" in sent.stdout
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["spec"]["datasets"] == [{"name": "chat", "weight": 1.5},
                                                                        {"name": "more", "weight": 1.0}]
    shown = usf(server, "jobs", "show", job_id)
    assert "chat × 1.5, more × 1" in shown.stdout, shown.stdout

    spec.write_text(SPEC.format(datasets="dataset: nowhere"))
    refused = usf(server, "submit", str(spec))
    assert refused.returncode == 2
    assert "dataset: no registered dataset 'nowhere'" in " ".join(refused.stderr.split()), refused.stderr
    spec.write_text(SPEC.format(datasets="dataset: chat\ndatasets: [{name: more}]"))
    local = usf(server, "submit", str(spec))   # refused before anything is sent
    assert local.returncode == 2 and "datasets: give dataset or datasets, not both" in local.stderr
    assert client.get("/jobs").json()["total"] == 1

    down = make_server()
    gone = usf(down, "jobs", "list")   # never started: nothing listens on its port
    assert gone.returncode == 2 and f"cannot reach the server at {down.url}" in " ".join(gone.stderr.split())


def test_the_client_sends_usf_api_key(make_server):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    key = server.create_key("cli", admin=True)
    refused = usf(server, "jobs", "list")
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr, refused.stderr
    server.env["USF_API_KEY"] = key
    listed = usf(server, "jobs", "list")
    assert listed.returncode == 0 and "0 job(s)" in listed.stdout, listed.stderr
