"""Models from ModelScope on demand, through its SDK against a local HTTP server that answers the SDK's own API
calls (MODELSCOPE_ENDPOINT; nothing leaves the machine): `usf-bios models pull --source modelscope`,
`POST /api/models/pull` with source modelscope and its progress, only config, tokenizer and safetensors weights
fetched, the cache reused, MODELSCOPE_API_TOKEN for a private model, a clear refusal for an unknown repository or
revision, and off without `modelscope` in SUPPORTED_MODEL_SOURCES or without the SDK."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.api.conftest import database_url, make_server, server_env  # noqa: F401
from tests.models.fake_hub import FakeModelScope
from tests.models.test_pull import DECOYS, train_from_the_cache, usf
from usf_bios.models.hub import PullError, cache_bytes, endpoint, plan_pull, refusal

PULLED = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"]
CLEAN = ("HF_TOKEN", "SUPPORTED_MODEL_SOURCES", "MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN", "MODELSCOPE_ENDPOINT")


@pytest.fixture
def hub(tiny_model_template):
    pytest.importorskip("modelscope")
    fake = FakeModelScope()
    fake.add("org/tiny", tiny_model_template, extra=DECOYS)
    fake.add("org/private", tiny_model_template, token="ms-secret")
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def no_sdk(tmp_path) -> str:
    """A PYTHONPATH entry under which `modelscope` cannot be imported (as if the extra were not installed)."""
    folder = tmp_path / "no-modelscope"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules['modelscope'] = None\n")
    return str(folder)


def test_endpoint_refusal_and_progress_bytes_of_the_modelscope_source(monkeypatch, tmp_path):
    for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)
    assert endpoint("modelscope") == "https://modelscope.cn"
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "www.modelscope.ai")   # the older variable: a host name
    assert endpoint("modelscope") == "https://www.modelscope.ai"
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://mirror.internal:8080/")
    assert endpoint("modelscope") == "http://mirror.internal:8080"

    assert refusal("modelscope", ("local", "huggingface")) == \
        "modelscope is not in SUPPORTED_MODEL_SOURCES (local,huggingface)"
    assert refusal("gitee", ("local", "modelscope")).startswith("'gitee' is not a hub")
    monkeypatch.setitem(sys.modules, "modelscope", None)   # as if the extra were not installed
    assert refusal("modelscope", ("modelscope",)) == \
        "the modelscope SDK is not installed (pip install 'usf-bios[modelscope]')"
    assert refusal("huggingface", ("huggingface",)) is None

    snapshot = tmp_path / "models" / "org--tiny" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_bytes(b"x" * 10)
    (snapshot / "model.safetensors.incomplete").write_bytes(b"x" * 100)   # a file being downloaded counts
    assert cache_bytes(tmp_path, "org/tiny", "modelscope") == 110
    assert cache_bytes(tmp_path, "org/other", "modelscope") == 0


@pytest.fixture
def env(usf_home, hub, tmp_path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**base, "USF_HOME": str(usf_home), "MODELSCOPE_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1",
            "MODELSCOPE_HOME": str(tmp_path / "modelscope-home")}   # the SDK's credentials folder, not ~/.modelscope


def test_cli_pull_from_modelscope_fetches_only_what_trains_and_later_uses_hit_the_cache(env, hub, usf_home, tmp_path):
    pulled = usf(env, "models", "pull", "--source", "modelscope", "org/tiny")
    assert pulled.returncode == 0, pulled.stderr
    snapshot = usf_home / "cache" / "modelscope" / "models" / "org--tiny" / "snapshots" / "master"
    assert f"pulled org/tiny → {snapshot}" in pulled.stdout and f"org/tiny@master from {hub.url}: 6 files" \
        in pulled.stdout, pulled.stdout
    assert sorted(p.name for p in snapshot.iterdir()) == PULLED
    assert sorted(hub.fetched) == [f"org/tiny/{name}" for name in PULLED]   # no decoy: pytorch_model.bin, onnx/, …
    assert "Downloading" in pulled.stderr and "6/6" in pulled.stderr   # the SDK's progress bar

    fetched = len(hub.fetched)
    again = usf(env, "models", "pull", "--source", "modelscope", "org/tiny")   # all in the cache: no file fetched
    assert again.returncode == 0 and len(hub.fetched) == fetched, again.stderr

    # training resolves org/tiny from the ModelScope cache, offline (the hub gone)
    train_from_the_cache({**env, "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"}, usf_home, tmp_path, "modelscope")


def test_cli_pull_from_modelscope_refusals_are_one_line(env, hub, monkeypatch):
    missing = usf(env, "models", "pull", "--source", "modelscope", "org/absent")
    assert missing.returncode == 1 and f"error: org/absent was not found on {hub.url}" in missing.stderr
    assert "Traceback" not in missing.stderr, missing.stderr
    off = usf({**env, "SUPPORTED_MODEL_SOURCES": "local,huggingface"}, "models", "pull", "--source", "modelscope",
              "org/tiny")
    assert off.returncode == 2 and off.stderr.strip().splitlines() == [
        "error: models pull: downloads from ModelScope are off here: modelscope is not in SUPPORTED_MODEL_SOURCES "
        "(local,huggingface)"], off.stderr
    unknown = usf(env, "models", "pull", "--source", "gitee", "org/tiny")
    assert unknown.returncode == 2 and "'gitee' is not a hub" in unknown.stderr
    assert hub.fetched == []

    # the rest in this process, through the plan the CLI makes first (one interpreter start each saved)
    for name in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(PullError, match="org/tiny has no revision 'v7'"):
        plan_pull("org/tiny", "v7", source="modelscope")
    with pytest.raises(PullError) as private:
        plan_pull("org/private", source="modelscope")
    assert "set MODELSCOPE_API_TOKEN" in str(private.value)
    assert "model.safetensors" in plan_pull("org/private", token="ms-secret", source="modelscope").files
    assert plan_pull("org/tiny", "v1.0", source="modelscope").revision == "v1.0"
    assert hub.fetched == []      # a plan lists files, it downloads none


def test_server_pull_from_modelscope_reports_progress_and_registers_a_usable_model(make_server, hub, tmp_path):
    hub.delay_s = 0.2    # the weights arrive in 64 KiB pieces: progress can be seen
    server = make_server(MODELSCOPE_ENDPOINT=hub.url, MODELSCOPE_HOME=str(tmp_path / "modelscope-home")).start()
    client = server.client()
    started = client.post("/models/pull", json={"repo_id": "org/tiny", "source": "modelscope"})
    assert started.status_code == 202, started.text
    pull = started.json()
    assert (pull["status"], pull["source"], pull["revision"]) == ("running", "modelscope", "master")
    seen = []
    deadline = time.monotonic() + 180
    while pull["status"] == "running":
        assert time.monotonic() < deadline, pull
        time.sleep(0.1)
        pull = client.get(f"/models/pulls/{pull['id']}").json()
        seen.append(pull["bytes_done"])
    assert pull["status"] == "completed", pull
    assert seen == sorted(seen) and pull["bytes_done"] == pull["total_bytes"] > 0 and pull["files"] == 6
    assert any(0 < done < pull["total_bytes"] for done in seen), seen   # partial files counted as they grow
    model = client.get("/models/org/tiny").json()
    assert model == pull["model"] and model["source"] == "modelscope" and model["valid"]
    assert model["path"].endswith("models/org--tiny/snapshots/master")

    from transformers import AutoModelForCausalLM, AutoTokenizer   # the registered folder loads and runs
    tokenizer = AutoTokenizer.from_pretrained(model["path"])
    logits = AutoModelForCausalLM.from_pretrained(model["path"])(**tokenizer("hello world", return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer)

    failed = client.post("/models/pull", json={"repo_id": "org/absent", "source": "modelscope"}).json()
    while failed["status"] == "running":
        time.sleep(0.1)
        failed = client.get(f"/models/pulls/{failed['id']}").json()
    assert failed["status"] == "failed" and failed["error"].startswith("org/absent was not found on")
    assert client.post("/models/pull", json={"repo_id": "org/tiny", "source": "gitee"}).status_code == 422


def test_server_pull_from_modelscope_is_off_without_the_source_or_the_sdk(make_server, hub, no_sdk):
    page_of = {}
    for label, env in (("source", {"SUPPORTED_MODEL_SOURCES": "local,huggingface"}), ("sdk", {"PYTHONPATH": no_sdk})):
        server = make_server(MODELSCOPE_ENDPOINT=hub.url, **env).start()
        refused = server.client().post("/models/pull", json={"repo_id": "org/tiny", "source": "modelscope"})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "source", refused.text
        assert "downloads from ModelScope are off on this server" in refused.json()["errors"][0]["message"]
        page_of[label] = server.client().get(server.url + "/models").text
        server.stop()
    assert 'value="modelscope"' not in page_of["source"].split('id="pull-source"')[1].split("</select>")[0]
    assert "modelscope is not in SUPPORTED_MODEL_SOURCES" in page_of["source"]
    assert "the modelscope SDK is not installed" in page_of["sdk"]
    assert hub.fetched == [] and hub.calls == []
