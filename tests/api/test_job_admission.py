"""What a submit and an estimate refuse before anything runs (the engine's device rules, trust_remote_code from a
non-admin key, a model's own tokenizer code in the server), what a non-admin key learns of the server's folders,
and the server paths a download carries (issue 14, items 11 and 12)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl
from usf_bios.engine.model import ModelLoadError, choose_placement, device_problems
from usf_bios.spec import JobSpec


def _spec(hp: dict | None = None, gpus: dict | None = None) -> dict:
    spec = job_spec("tiny", "chat", **(hp or {}))
    spec["gpu_config"] = {"num_gpus": 0, **(gpus or {})}
    return spec


REFUSED = [
    ({"quantization": "4bit"}, {}, "hyperparameters.quantization", "4bit needs a CUDA GPU"),
    ({"quantization": "8bit"}, {}, "hyperparameters.quantization", "8bit needs a CUDA GPU"),
    ({"precision": "fp16"}, {}, "hyperparameters.precision", "fp16 needs a CUDA GPU"),
]


@pytest.mark.parametrize("hp, gpus, field, reason", REFUSED)
def test_device_problems_are_what_the_engine_refuses(hp, gpus, field, reason):
    spec = JobSpec.model_validate(_spec(hp, gpus))
    assert device_problems(spec)[0][0] == field and reason in device_problems(spec)[0][1]
    with pytest.raises(ModelLoadError, match=f"^{field}: .*{reason}"):
        choose_placement(spec)


@pytest.fixture
def local_ready(local_app, tiny_model_template, tmp_path):
    client = local_app.client
    register_model(client, "tiny", tiny_model_in(local_app.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    return local_app


@pytest.mark.parametrize("hp, gpus, field, reason", REFUSED)
def test_estimate_and_submit_refuse_what_the_engine_would(local_ready, hp, gpus, field, reason):
    client = local_ready.client
    for route in ("/jobs/estimate", "/jobs"):
        refused = client.post(route, json=_spec(hp, gpus))
        assert refused.status_code == 422, (route, refused.text)
        [error] = refused.json()["errors"]
        assert error["field"] == field and reason in error["message"], (route, error)
    assert client.get("/jobs").json()["total"] == 0   # nothing was queued
    assert list((local_ready.home / "data" / "output").iterdir()) == []


def test_valid_specs_still_estimate(local_ready):
    client = local_ready.client
    cpu = client.post("/jobs/estimate", json=_spec({"precision": "bf16"}))
    assert cpu.status_code == 200 and cpu.json()["gpu_type"] == "cpu" and cpu.json()["steps"] > 0, cpu.text
    gpu = client.post("/jobs/estimate", json=_spec({"quantization": "4bit"}, {"num_gpus": 1, "gpu_type": "H100"}))
    assert gpu.status_code == 200 and gpu.json()["peak_vram_gb"] > 0, gpu.text


@pytest.fixture
def keyed(make_server, tiny_model_template, tmp_path):
    """A server that requires keys: an admin and a user key (made with the CLI), each with the tiny model and the
    chat dataset."""
    server = make_server(USF_REQUIRE_AUTH="1").start()
    admin, user = server.client(server.create_key("root", admin=True)), server.client(server.create_key("user"))
    folder = tiny_model_in(server.home, tiny_model_template)
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    for client in (admin, user):
        register_model(client, "tiny", folder)
        upload_dataset(client, dataset, name="chat")
    yield server, admin, user
    admin.close()
    user.close()


def test_model_roots_are_shown_to_admins_only(keyed, tmp_path, tiny_model_template):
    server, admin, user = keyed
    elsewhere = shutil.copytree(tiny_model_template, tmp_path / "elsewhere" / "tiny")
    roots = [str((server.home / "models").resolve()), str((server.home / "cache").resolve())]
    body = {"name": "t", "source": "local", "path": str(elsewhere)}
    for_user = user.post("/models", json=body)
    assert for_user.status_code == 403 and "USF_ALLOWED_MODEL_ROOTS" in for_user.json()["detail"]
    assert not any(root in for_user.text for root in roots), for_user.text
    for_admin = admin.post("/models", json=body)
    assert for_admin.status_code == 403 and all(root in for_admin.text for root in roots), for_admin.text


def _own_code_model(home: Path, template: Path, marker: Path) -> Path:
    """The tiny model with a tokenizer class of its own, whose module writes ``marker`` when it is imported."""
    folder = tiny_model_in(home, template, name="test--own-code")
    (folder / "my_tok.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast\n\n\n"
                                      "class MyTok(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MyTok", auto_map={"AutoTokenizer": [None, "my_tok.MyTok"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_trust_remote_code_is_admin_only_and_never_runs_in_the_server(keyed, tiny_model_template, tmp_path):
    server, admin, user = keyed
    marker = tmp_path / "model-code-ran"
    folder = _own_code_model(server.home, tiny_model_template, marker)
    for client in (admin, user):
        register_model(client, "own", folder)
    trusting = {**job_spec("own", "chat"), "trust_remote_code": True}
    for route in ("/jobs/estimate", "/jobs"):
        refused = user.post(route, json=trusting)
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"].startswith("trust_remote_code: only an admin key may set trust_remote_code")
    assert user.get("/jobs").json()["total"] == 0

    for spec in (trusting, job_spec("own", "chat")):   # the server loads tokenizers without the model's code
        answer = admin.post("/jobs/estimate", json=spec)
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["errors"]
        assert error["field"] == "base_model" and "computed only by the engine" in error["message"]
    assert not marker.exists()
    assert user.post("/jobs/estimate", json=job_spec("tiny", "chat")).status_code == 200


def test_the_download_names_paths_relative_to_the_storage_root(server, tiny_model_template, tmp_path):
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    dataset = upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(8)), name="chat")
    job = submit(client, job_spec("tiny", "chat", max_steps=2, save_steps=100, eval_steps=100))
    assert wait_for(client, job["id"], final, timeout=600)["status"] == "completed"
    tar = client.get(f"/jobs/{job['id']}/download")
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        text = archive.extractfile(f"{job['id']}/job.yaml").read().decode()
    shipped = yaml.safe_load(text)
    assert shipped["base_model"] == "models/test--tiny"
    assert shipped["dataset"] == f"data/datasets/{dataset['id']}/chat.jsonl"
    assert str(server.home) not in text and str(server.home.resolve()) not in text
    on_disk = yaml.safe_load((server.home / "data" / "output" / job["id"] / "job.yaml").read_text())
    assert Path(on_disk["base_model"]).is_absolute() and Path(on_disk["dataset"]).is_absolute()
    assert {k: v for k, v in shipped.items() if k not in ("base_model", "dataset")} == \
        {k: v for k, v in on_disk.items() if k not in ("base_model", "dataset")}
    client.close()
