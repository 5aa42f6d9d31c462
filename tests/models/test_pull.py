"""Models from the Hub on demand, against a local HTTP server that answers like the Hub (HF_ENDPOINT; nothing
leaves the machine): `usf-bios models pull`, `POST /api/models/pull` with its progress, only config, tokenizer and
safetensors weights fetched, the cache reused, HF_TOKEN for a gated model, and off without `huggingface` in
SUPPORTED_MODEL_SOURCES."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.api.conftest import database_url, make_server, server_env  # noqa: F401
from tests.conftest import chat_rows, write_jsonl
from tests.models.fake_hub import COMMIT, FakeHub
from usf_bios.models.hub import choose_files

DECOYS = {"pytorch_model.bin": b"\0" * 4096, "onnx/model.onnx": b"onnx", "original/consolidated.pth": b"pth",
          "model.gguf": b"GGUF", "README.md": b"# tiny", "tf_model.h5": b"h5", ".gitattributes": b"*"}


@pytest.fixture
def hub(tiny_model_template):
    fake = FakeHub()
    fake.add("org/tiny", tiny_model_template, extra=DECOYS)
    fake.add("org/gated", tiny_model_template, token="hf_secret")
    fake.start()
    yield fake
    fake.stop()


def usf(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_bios", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def train_from_the_cache(env: dict[str, str], usf_home, tmp_path, source: str) -> None:
    """Two training steps on the pulled org/tiny with ``env``'s hub unreachable: the model resolves from the
    source's cache, and the job log names that source."""
    spec = tmp_path / "job.yaml"
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    spec.write_text(f"name: pulled\nbase_model: org/tiny\ndataset: {data}\ngpu_config: {{num_gpus: 0}}\n"
                    "hyperparameters: {max_steps: 2, batch_size: 2, max_seq_length: 64, precision: fp32, "
                    "gradient_checkpointing: false}\n")
    trained = usf(env, "train", str(spec), "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert f"({source})" in next((usf_home / "data" / "logs").glob("pulled-*.log")).read_text()


@pytest.fixture
def env(usf_home, hub) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "SUPPORTED_MODEL_SOURCES")}
    return {**base, "USF_HOME": str(usf_home), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_choose_files_prefers_safetensors_and_skips_what_training_does_not_need():
    repo = {"config.json": 1, "model-00001-of-00002.safetensors": 5, "model-00002-of-00002.safetensors": 5,
            "model.safetensors.index.json": 1, "pytorch_model.bin": 9, "pytorch_model.bin.index.json": 1,
            "tokenizer.json": 2, "tokenizer.model": 2, "special_tokens_map.json": 1, "chat_template.jinja": 1,
            "original/consolidated.00.pth": 9, "onnx/model.onnx": 9, "model.gguf": 9, "README.md": 1, "merges.txt": 1}
    assert sorted(choose_files(repo)) == ["chat_template.jinja", "config.json", "merges.txt",
                                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                          "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                                          "tokenizer.model"]
    mistral = {"config.json": 1, "consolidated.safetensors": 9, "model-00001-of-00001.safetensors": 9, "params.json": 1}
    assert sorted(choose_files(mistral)) == ["config.json", "model-00001-of-00001.safetensors", "params.json"]
    legacy = {"config.json": 1, "pytorch_model.bin": 9, "tokenizer.json": 1, "flax_model.msgpack": 9}
    assert sorted(choose_files(legacy)) == ["config.json", "pytorch_model.bin", "tokenizer.json"]


def test_cli_pull_fetches_only_what_trains_and_later_uses_hit_the_cache(env, hub, usf_home, tmp_path):
    pulled = usf(env, "models", "pull", "org/tiny")
    assert pulled.returncode == 0, pulled.stderr
    snapshot = usf_home / "cache" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    assert f"pulled org/tiny → {snapshot}" in pulled.stdout and "6 files" in pulled.stdout
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    assert not [f for f in hub.fetched if f.endswith(tuple(DECOYS))], hub.fetched
    assert "Fetching 6 files" in pulled.stderr   # huggingface_hub's progress bar

    fetched = len(hub.fetched)
    again = usf(env, "models", "pull", "org/tiny")   # everything is in the cache: nothing fetched twice
    assert again.returncode == 0 and len(hub.fetched) == fetched, again.stderr

    # training resolves org/tiny from the hub cache, offline
    train_from_the_cache({**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, usf_home, tmp_path, "huggingface")


def test_cli_pull_refusals_name_their_cause(env, hub):
    gated = usf(env, "models", "pull", "org/gated")
    assert gated.returncode == 1 and f"org/gated is gated on {hub.url}: accept its terms there and set HF_TOKEN" in \
        " ".join(gated.stderr.split()), gated.stderr
    assert usf({**env, "HF_TOKEN": "hf_secret"}, "models", "pull", "org/gated").returncode == 0
    missing = usf(env, "models", "pull", "org/absent")
    assert missing.returncode == 1 and "org/absent was not found on" in missing.stderr
    revision = usf(env, "models", "pull", "org/tiny", "--revision", "v7")
    assert revision.returncode == 1 and "org/tiny has no revision 'v7'" in revision.stderr
    off = usf({**env, "SUPPORTED_MODEL_SOURCES": "local"}, "models", "pull", "org/tiny")
    assert off.returncode == 2 and "huggingface is not in SUPPORTED_MODEL_SOURCES (local)" in off.stderr
    assert usf(env, "models", "pull", "tiny").returncode == 2
    assert not any("org/tiny" in f for f in hub.fetched)


def test_server_pull_reports_progress_and_registers_the_model(make_server, hub):
    hub.delay_s = 0.2    # the weights arrive in 64 KiB pieces: progress can be seen
    server = make_server(HF_ENDPOINT=hub.url).start()
    client = server.client()
    started = client.post("/models/pull", json={"repo_id": "org/tiny"})
    assert started.status_code == 202, started.text
    pull = started.json()
    assert pull["status"] == "running" and pull["name"] == "org/tiny"
    assert client.post("/models/pull", json={"repo_id": "org/tiny"}).json()["id"] == pull["id"]   # one at a time
    seen = []
    deadline = time.monotonic() + 180
    while pull["status"] == "running":
        assert time.monotonic() < deadline, pull
        time.sleep(0.1)
        pull = client.get(f"/models/pulls/{pull['id']}").json()
        seen.append(pull["bytes_done"])
    assert pull["status"] == "completed", pull
    assert seen == sorted(seen) and pull["bytes_done"] == pull["total_bytes"] > 0 and pull["files"] == 6
    model = client.get("/models/org/tiny").json()
    assert model == pull["model"] and model["source"] == "huggingface" and model["valid"]
    assert model["path"].endswith(f"models--org--tiny/snapshots/{COMMIT}")

    failed = client.post("/models/pull", json={"repo_id": "org/gated"}).json()
    while failed["status"] == "running":
        time.sleep(0.1)
        failed = client.get(f"/models/pulls/{failed['id']}").json()
    assert failed["status"] == "failed" and "gated" in failed["error"] and failed["model"] is None
    bad = client.post("/models/pull", json={"repo_id": "not a repo"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "repo_id"
    assert client.get("/models/pulls/nope").status_code == 404


def test_server_pull_is_off_without_the_huggingface_source(make_server, hub):
    server = make_server(HF_ENDPOINT=hub.url, SUPPORTED_MODEL_SOURCES="local").start()
    refused = server.client().post("/models/pull", json={"repo_id": "org/tiny"})
    assert refused.status_code == 422 and "off on this server" in refused.json()["errors"][0]["message"]
    page = server.client().get(server.url + "/models").text
    assert 'id="pull-disabled"' in page and 'id="pull-form"' not in page
    assert hub.fetched == []
