"""The `usf-bios` command's answers to bad input: exit codes and messages that name the fault."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import chat_rows, write_jsonl


def usf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_bios", *args], capture_output=True, text=True, timeout=300)


def test_bad_spec_exits_2_naming_the_fields(usf_home, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nbase_model: m\ndataset: d\nhyperparameters: {lora_r: 0, colour: red}\n")
    result = usf("train", str(spec))
    assert result.returncode == 2
    assert "hyperparameters.lora_r: must be ≥ 1" in result.stderr and "hyperparameters.colour: unknown field" in result.stderr


def test_resume_of_an_unknown_job_is_refused(usf_home):
    result = usf("train", "--resume", "no-such-job")
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr


def test_datasets_check_reports_file_line_and_reason(usf_home, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n")
    result = usf("datasets", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:1: CSV has columns [question, answer]" in result.stderr


def test_datasets_check_prints_stats_with_a_model_tokenizer(layout, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    result = usf("datasets", "check", str(data), "--model", tiny_model, "--max-seq-length", "40")
    assert result.returncode == 0, result.stderr
    assert "messages, 20 rows" in result.stdout and "truncated at 40" in result.stdout




def test_bench_refuses_an_unknown_baseline_or_workload_by_name(tmp_path):
    result = usf("bench", "--config", "tiny-llama-lora-fp32-256", "--baseline", "axolotl", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown baseline 'axolotl'" in result.stderr
    result = usf("bench", "--config", "tiny-llama-lora-fp32-256", "--workload", "padded", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown workload 'padded'" in result.stderr
