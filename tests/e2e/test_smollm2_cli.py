"""End to end through the `usf-bios` command on the real SmolLM2-135M-Instruct (CPU, a few minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from usf_bios import demo
from usf_bios.models.gguf import SMOLLM2_NAME, smollm2_gguf

pytestmark = pytest.mark.slow


def usf(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_bios", *args], capture_output=True, text=True, timeout=timeout)


def test_import_check_train_and_the_adapter_learns_a_fact(layout, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = usf("models", "import-gguf", str(smollm2_gguf()), "--name", SMOLLM2_NAME)
    assert imported.returncode == 0, imported.stderr
    base_path = layout.models / SMOLLM2_NAME
    assert json.loads((base_path / "config.json").read_text())["model_type"] == "llama"
    assert (base_path / "model.safetensors").stat().st_size > 200e6  # 135M parameters in bf16

    dataset = demo.write_fact_dataset(tmp_path / "fact.jsonl")
    checked = usf("datasets", "check", str(dataset), "--model", SMOLLM2_NAME, "--max-seq-length", "64")
    assert checked.returncode == 0, checked.stderr
    assert "messages, 16 rows" in checked.stdout and "rows" in checked.stdout

    spec_file = tmp_path / "fact.yaml"
    spec_file.write_text(yaml.safe_dump(demo.demo_spec(dataset).model_dump(mode="json")))
    trained = usf("train", str(spec_file), "--quiet")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    job_id = trained.stdout.split()[1]
    output = layout.job_output(job_id)
    assert f"completed job {job_id}" in " ".join(trained.stdout.split())

    tokenizer = AutoTokenizer.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    def ask(model) -> str:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": demo.HELD_OUT_QUESTION}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    before = ask(base)
    tuned = PeftModel.from_pretrained(base, output)  # plain peft, nothing of ours
    after = ask(tuned)
    assert demo.FACT_KEYWORD not in before
    assert demo.FACT_KEYWORD in after, after


def test_demo_command_explains_itself_and_shows_both_answers(usf_home):
    result = usf("demo", "--steps", "12")
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    # the fact taught, that the question asked is not a training question, then the two answers and a verdict
    taught = out.index(f"The fact to teach (made up, so no model has seen it): “{demo.FACT_ANSWER}”")
    asked = out.index(f"Asking a question that was not among the {len(demo.TRAIN_QUESTIONS)} training questions: "
                      f"“{demo.HELD_OUT_QUESTION}”")
    answers = out.index("with the trained adapter")
    assert taught < asked < answers
    assert demo.HELD_OUT_QUESTION not in demo.TRAIN_QUESTIONS
    assert f"The adapter's answer names {demo.FACT_KEYWORD}; the base model's does not" in out
    # no library's progress bars, advice or deprecation warnings
    for noise in ("Warning", "it/s]", "Loading weights", "[transformers]", "warnings.warn"):
        assert noise not in result.stdout + result.stderr, noise
