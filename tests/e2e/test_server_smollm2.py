"""The whole loop through the REST API on the real SmolLM2-135M-Instruct (CPU): upload, register,
train while following SSE, read metrics, download the tar and load the adapter with plain peft."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import pytest
import torch

from tests.api.flows import register_model, submit, upload_dataset
from usf_bios import demo
from usf_bios.models.gguf import SMOLLM2_NAME, smollm2_gguf

pytestmark = pytest.mark.slow


def test_upload_register_train_follow_download_and_load(server, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = server.cli("models", "import-gguf", str(smollm2_gguf()), "--name", SMOLLM2_NAME)
    assert imported.returncode == 0, imported.stderr
    client = server.client()
    model = register_model(client, "smollm2", server.home / "models" / SMOLLM2_NAME)
    assert model["parameters"] == 134_515_008 and model["model_type"] == "llama"
    dataset = upload_dataset(client, demo.write_fact_dataset(tmp_path / "velmora.jsonl"), name="velmora")
    assert (dataset["format"], dataset["rows"]) == ("messages", 16)

    spec = demo.demo_spec(tmp_path / "unused.jsonl", max_steps=12).model_dump(mode="json")
    spec.update(base_model="smollm2", dataset="velmora")
    estimate = client.post("/jobs/estimate", json=spec).json()
    assert estimate["steps"] == 12 and estimate["parameters"] == 134_515_008
    job = submit(client, spec)

    seen_steps, last_status = [], None
    with httpx.stream("GET", f"{server.url}/api/jobs/{job['id']}/events", timeout=600) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "metric":
                seen_steps.append(json.loads(line[6:])["step"])
            elif line.startswith("data: ") and event == "status":
                last_status = json.loads(line[6:])["status"]
    assert seen_steps == list(range(1, 13)) and last_status == "completed"

    points = client.get(f"/jobs/{job['id']}/metrics").json()
    assert len(points) == 12 and points[-1]["loss"] < points[0]["loss"] / 5

    response = client.get(f"/jobs/{job['id']}/download")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = archive.getnames()
        assert f"{job['id']}/adapter_model.safetensors" in names and f"{job['id']}/job.yaml" in names
        archive.extractall(tmp_path / "download", filter="data")
    adapter = tmp_path / "download" / job["id"]

    base = AutoModelForCausalLM.from_pretrained(server.home / "models" / SMOLLM2_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tuned = PeftModel.from_pretrained(base, adapter)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": demo.HELD_OUT_QUESTION}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert demo.FACT_KEYWORD in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
