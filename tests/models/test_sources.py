"""Model resolution offline: folder, USF_MODEL_PATH name, Hugging Face and ModelScope cache layouts."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from usf_bios.models.sources import ModelNotFound, resolve_model
from usf_bios.models.validate import ModelFolderError, check_model_folder

ALL = ("local", "huggingface", "modelscope")


def fake_model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_folder_path_and_registry_names(layout, tmp_path):
    direct = fake_model(tmp_path / "somewhere" / "m")
    assert resolve_model(str(direct), layout, ALL).path == direct.resolve()
    registered = fake_model(layout.models / "Org--Model-7B")
    for name in ("Org--Model-7B", "Org/Model-7B"):
        found = resolve_model(name, layout, ALL)
        assert (found.path, found.source) == (registered.resolve(), "local")


def test_huggingface_cache_snapshot_by_ref(layout):
    repo = layout.hf_hub_cache / "models--acme--chat-1b"
    fake_model(repo / "snapshots" / "old111")
    current = fake_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    found = resolve_model("acme/chat-1b", layout, ALL)
    assert (found.path, found.source) == (current, "huggingface")
    with pytest.raises(ModelNotFound, match="sources: local, modelscope"):
        resolve_model("acme/chat-1b", layout, ("local", "modelscope"))


@pytest.mark.parametrize("relative", ["models/qwen/Qwen2.5-0.5B", "qwen/Qwen2___5-0___5B", "hub/models/qwen/Qwen2.5-0.5B",
                                      "models/qwen--Qwen2.5-0.5B/snapshots/master"])
def test_modelscope_cache_layouts(layout, relative):
    folder = fake_model(layout.modelscope_cache / relative)
    found = resolve_model("qwen/Qwen2.5-0.5B", layout, ALL)
    assert (found.path, found.source) == (folder, "modelscope")


def test_modelscope_snapshots_master_first_else_the_newest(layout):
    snapshots = layout.modelscope_cache / "models" / "qwen--tiny" / "snapshots"
    older, newer = fake_model(snapshots / "v1.0"), fake_model(snapshots / "v2.0")
    os.utime(older, (1, 1))
    assert resolve_model("qwen/tiny", layout, ALL).path == newer
    master = fake_model(snapshots / "master")
    os.utime(master, (1, 1))
    assert resolve_model("qwen/tiny", layout, ALL).path == master
    (snapshots / "broken").mkdir()   # an interrupted pull's folder without config.json is never chosen
    assert resolve_model("qwen/tiny", layout, ALL).path == master


def test_not_found_says_where_it_looked(layout):
    with pytest.raises(ModelNotFound) as info:
        resolve_model("nobody/nothing", layout, ALL)
    message = str(info.value)
    assert str(layout.models) in message and "Hugging Face cache" in message and "ModelScope cache" in message
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model("/definitely/not/here", layout, ALL)
    with pytest.raises(ModelNotFound):
        resolve_model("x/../../../etc", layout, ("local",))  # a name never leaves USF_MODEL_PATH


def test_validation_names_each_missing_piece(tmp_path):
    folder = fake_model(tmp_path / "m")
    assert check_model_folder(folder)["model_type"] == "llama"
    (folder / "model.safetensors").unlink()
    (folder / "tokenizer.json").unlink()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    problems = " | ".join(info.value.problems)
    assert "config.json is not valid JSON" in problems and "no weights" in problems and "no tokenizer files" in problems
    shutil.rmtree(folder)
    with pytest.raises(ModelFolderError, match="does not exist"):
        check_model_folder(folder)


def test_missing_shard_is_named(tmp_path):
    folder = fake_model(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                                     "b": "model-00002-of-00002.safetensors"}}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="shard model-00002-of-00002.safetensors"):
        check_model_folder(folder)
