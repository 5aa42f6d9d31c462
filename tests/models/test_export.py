"""`usf-bios export`: a trained job's adapter merged into its base (plain from_pretrained gives base+adapter's logits
within bf16 tolerance) and written as GGUF that the project's own importer reads back to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import chat_rows, write_jsonl
from usf_bios.models.gguf import import_gguf


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


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_export_merges_the_adapter_and_writes_gguf_the_importer_reads_back(layout, tiny_model, trained_job, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    status = tmp_path / "status.json"
    result = usf("export", trained_job, "--merged", str(tmp_path / "merged"), "--gguf", str(tmp_path / "m.gguf"),
                 "--status-file", str(status))
    assert result.returncode == 0, result.stderr
    assert json.loads(status.read_text())["stage"] == "completed"
    merged_dir = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in merged_dir.iterdir()}
    assert not (merged_dir / "adapter_config.json").exists()

    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 230, 3]])
    base = AutoModelForCausalLM.from_pretrained(layout.models / tiny_model, dtype=torch.bfloat16)
    plain = logits(base, ids)
    reference = logits(PeftModel.from_pretrained(base, layout.job_output(trained_job)), ids)
    assert (reference - plain).abs().max() > 0.05           # the adapter changes the answer …
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    assert torch.allclose(logits(merged, ids), reference, atol=0.05, rtol=0.02)   # … and the merge keeps it

    imported = import_gguf(tmp_path / "m.gguf", "test--from-gguf", layout)
    back = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.bfloat16)
    assert torch.allclose(logits(back, ids), logits(merged, ids), atol=1e-3)   # bf16 in, bf16 out: the same weights


def test_export_refuses_a_job_without_an_adapter(layout, tmp_path):
    result = usf("export", "no-such-job", "--merged", str(tmp_path / "out"))
    assert result.returncode == 2 and "no-such-job" in result.stderr
