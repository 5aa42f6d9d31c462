"""`usf-bios export`: a trained job's adapter merged into its base (plain from_pretrained gives base+adapter's logits
within bf16 tolerance) and written as GGUF that the project's own importer reads back to the same logits."""

from __future__ import annotations

import json

import torch

from tests.models.conftest import usf
from usf_bios.models.gguf import import_gguf


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
