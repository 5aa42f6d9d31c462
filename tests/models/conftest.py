"""A job trained by `usf-bios train` on the tiny model, for the tests of what is done with its adapter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import chat_rows, write_jsonl


def usf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_bios", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def trained_job(layout, tiny_model, tmp_path) -> str:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    spec = {"name": "export-me", "base_model": tiny_model, "dataset": str(data),
            "hyperparameters": {"max_steps": 3, "learning_rate": 5e-2, "batch_size": 2, "gradient_accumulation_steps": 1,
                                "max_seq_length": 64, "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0,
                                "val_split": 0.0, "precision": "fp32", "gradient_checkpointing": False},
            "gpu_config": {"num_gpus": 0}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = usf("train", str(tmp_path / "job.yaml"))
    assert result.returncode == 0, result.stderr
    return next(p.name for p in layout.output.iterdir() if p.name.startswith("export-me-"))


