"""`usf-bios train` checks the spec against the model, the dataset and this host before the job exists: on a fault
it prints one line naming the field (file:line for a dataset row), creates nothing and exits 2 (issue 18, item 3)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import chat_rows, write_jsonl
from tests.test_cli import usf


def _spec(tmp_path, model: str, dataset: str, extra: str = "gpu_config: {num_gpus: 0}\n"):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: pre\nbase_model: {model}\ndataset: {dataset}\n"
                    "hyperparameters: {max_steps: 1, precision: fp32}\n" + extra)
    return spec


def _assert_refused(result, layout, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr          # one line: no traceback, no repeats
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]
    assert result.stdout == ""                     # no job id was printed: none exists
    assert list(layout.output.iterdir()) == [] and list(layout.logs.iterdir()) == []
    assert not layout.checkpoints.exists() or list(layout.checkpoints.iterdir()) == []
    return lines[0]


def test_unknown_model(layout, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    _assert_refused(usf("train", str(_spec(tmp_path, "org--no-such-model", data))), layout,
                    "error: base_model: model 'org--no-such-model' not found")


def test_model_folder_without_weights(layout, tiny_model, tmp_path):
    (layout.models / tiny_model / "model.safetensors").unlink()
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    _assert_refused(usf("train", str(_spec(tmp_path, tiny_model, data))), layout,
                    "error: base_model: model folder", "no weights")


def test_missing_dataset(layout, tiny_model, tmp_path):
    _assert_refused(usf("train", str(_spec(tmp_path, tiny_model, str(tmp_path / "nope.jsonl")))), layout,
                    "error: dataset: dataset", "nope.jsonl", "is not a file")


def test_bad_dataset_row_names_file_and_line(layout, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    with data.open("a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n")
    line = _assert_refused(usf("train", str(_spec(tmp_path, tiny_model, data))), layout, f"error: dataset: {data}:4: ")
    assert "robot" in line


def test_chat_rows_without_a_chat_template(layout, tiny_model_template, tmp_path):
    from tests.tiny import build_tiny_model

    build_tiny_model(layout.models / "test--plain", chat_template=None)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    _assert_refused(usf("train", str(_spec(tmp_path, "test--plain", data))), layout,
                    "error: dataset:", "need a chat template")


@pytest.mark.parametrize(("extra", "expected"), [
    ("hyperparameters: {quantization: 4bit}\ngpu_config: {num_gpus: 0}\n",
     "error: hyperparameters.quantization: 4bit needs a CUDA GPU"),
    ("gpu_config: {num_gpus: 1}\n",
     "error: gpu_config.num_gpus: the job asks for 1 GPU and this host has no GPU; set gpu_config.num_gpus: 0"),
    ("hyperparameters: {quantization: 4bit}\ngpu_config: {num_gpus: 1}\n",
     "error: gpu_config.num_gpus: the job asks for 1 GPU and this host has no GPU"),
])
def test_device_against_the_spec(layout, tiny_model, tmp_path, extra, expected):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: pre\nbase_model: {tiny_model}\ndataset: {data}\n" + extra)
    _assert_refused(usf("train", str(spec)), layout, expected)


def test_a_good_spec_still_trains_and_prints_unwrapped_paths(layout, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    result = usf("train", str(_spec(tmp_path, tiny_model, data)), "--quiet")
    assert result.returncode == 0, result.stderr
    [job_dir] = layout.output.iterdir()
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"output {job_dir}")   # piped: a long path is not wrapped onto a second line
    assert any(line.startswith("completed job") and line.endswith(str(job_dir)) for line in lines)


def test_resume_checks_the_locked_spec_first(layout, tiny_model, tmp_path):
    from usf_bios.engine.jobdir import create_job
    from usf_bios.spec import load_spec

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    job_id = create_job(load_spec(_spec(tmp_path, tiny_model, data)), layout)
    data.unlink()                                   # the locked dataset is gone since
    result = usf("train", "--resume", job_id)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: dataset: dataset") and "Traceback" not in result.stderr
    assert not layout.job_log(job_id).exists() and not layout.job_events(job_id).exists()   # the engine never ran
