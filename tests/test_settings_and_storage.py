"""Settings derive every path from USF_HOME unless told otherwise; `confine` keeps user names inside a root."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from usf_bios.settings import Settings, get_settings
from usf_bios.storage import PathOutsideRoot, StorageLayout, confine


def test_defaults_follow_usf_home(usf_home):
    s = get_settings()
    assert s.output_path == usf_home / "data" / "output"
    assert s.checkpoint_path == usf_home / "data" / "checkpoints"
    assert s.log_path == usf_home / "data" / "logs"
    assert s.model_path == usf_home / "models"
    assert s.hf_home == usf_home / "cache" and s.transformers_cache == usf_home / "cache" / "hub"
    assert s.database_url == f"sqlite:///{usf_home}/data/usf.db"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.supported_model_sources == ("local", "huggingface", "modelscope")


def test_each_variable_overrides(usf_home, monkeypatch, tmp_path):
    monkeypatch.setenv("OUTPUT_PATH", str(tmp_path / "out"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("USF_MODEL_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("SUPPORTED_MODEL_SOURCES", "local, huggingface")
    monkeypatch.setenv("USF_PORT", "9001")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@localhost/usf")
    s = Settings()
    assert s.output_path == tmp_path / "out" and s.transformers_cache == tmp_path / "hf" / "hub"
    assert s.model_path == tmp_path / "models" and s.port == 9001
    assert s.supported_model_sources == ("local", "huggingface") and s.database_url.startswith("postgresql")
    layout = StorageLayout.from_settings(s)
    assert layout.job_events("j1") == usf_home / "data" / "logs" / "j1.events.jsonl"


def test_bad_values_are_refused(usf_home, monkeypatch):
    monkeypatch.setenv("SUPPORTED_MODEL_SOURCES", "local,ftp")
    with pytest.raises(ValidationError, match="ftp"):
        Settings()
    monkeypatch.setenv("SUPPORTED_MODEL_SOURCES", "local")
    monkeypatch.setenv("USF_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "..", "a/../../../etc"])
def test_confine_refuses_escapes(tmp_path, name):
    with pytest.raises(PathOutsideRoot):
        confine(tmp_path, name)


def test_confine_follows_symlinks_before_judging(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "link")
    with pytest.raises(PathOutsideRoot):
        confine(root, "link/secret")
    assert confine(root, "sub/file.txt") == (root / "sub" / "file.txt").resolve()


def test_job_paths_refuse_traversal(layout):
    with pytest.raises(PathOutsideRoot):
        layout.job_output("../../etc")
