"""The job spec: YAML/JSON loading, defaults, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from usf_bios.spec import JobSpec, SpecError, diff_specs, load_spec, parse_spec

MINIMAL = {"name": "support-bot-v1", "base_model": "Qwen--Qwen2.5-7B-Instruct", "dataset": "my_dataset.jsonl"}


def test_architecture_example_loads_from_yaml_with_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("""
name: support-bot-v1
base_model: Qwen--Qwen2.5-7B-Instruct
dataset: my_dataset.jsonl
hyperparameters:
  num_epochs: 3
  learning_rate: 2.0e-4
  target_modules: [q_proj, v_proj]
  quantization: 4bit
gpu_config: {num_gpus: 0, gpu_type: any}
""")
    spec = load_spec(path)
    assert spec.hyperparameters.target_modules == ["q_proj", "v_proj"]
    assert spec.hyperparameters.quantization == "4bit" and spec.gpu_config.num_gpus == 0
    assert spec.hyperparameters.lora_r == 16 and spec.hyperparameters.lr_scheduler == "cosine"
    assert spec.dataset_format == "auto" and spec.trust_remote_code is False


def test_json_and_yaml_round_trip(tmp_path):
    spec = parse_spec(MINIMAL)
    (tmp_path / "a.json").write_text(json.dumps(spec.model_dump(mode="json")))
    (tmp_path / "a.yaml").write_text(spec.to_yaml())
    assert load_spec(tmp_path / "a.json") == spec == load_spec(tmp_path / "a.yaml")


@pytest.mark.parametrize("override, problem", [
    ({"hyperparameters": {"lora_r": 0}}, "hyperparameters.lora_r: must be ≥ 1"),
    ({"hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate: must be > 0"),
    ({"hyperparameters": {"lora_dropout": 1.0}}, "hyperparameters.lora_dropout: must be < 1"),
    ({"hyperparameters": {"val_split": 0.9}}, "hyperparameters.val_split: must be ≤ 0.5"),
    ({"hyperparameters": {"quantization": "3bit"}}, "hyperparameters.quantization: must be one of 'none', '4bit' or '8bit'"),
    ({"hyperparameters": {"lr_scheduler": "step"}}, "hyperparameters.lr_scheduler: must be one of"),
    ({"hyperparameters": {"precision": "int8"}}, "hyperparameters.precision: must be one of"),
    ({"hyperparameters": {"target_modules": []}}, "hyperparameters.target_modules: must name at least one module"),
    ({"hyperparameters": {"lora_rank": 8}}, "hyperparameters.lora_rank: unknown field"),
    ({"gpu_config": {"num_gpus": -1}}, "gpu_config.num_gpus: must be ≥ 0"),
    ({"extra": 1}, "extra: unknown field"),
    ({"name": "../escape"}, "name: may hold only letters"),
    ({"hyperparameters": {"batch_size": "four"}}, "hyperparameters.batch_size: input should be a valid integer"),
])
def test_bad_values_name_their_field(override, problem):
    data = {**MINIMAL, **{k: v for k, v in override.items()}}
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_missing_required_fields_and_bad_files(tmp_path):
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x"})
    assert info.value.problems == ["base_model: required", "dataset: required"]
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_spec_is_frozen_and_diff_names_what_changed():
    spec = parse_spec(MINIMAL)
    with pytest.raises(Exception):
        spec.dataset = "other"  # type: ignore[misc]
    changed = parse_spec({**MINIMAL, "name": "renamed", "hyperparameters": {"learning_rate": 1e-3}})
    assert diff_specs(spec, changed) == ["hyperparameters.learning_rate: 0.0002 → 0.001"]
    assert spec.fingerprint() == parse_spec({**MINIMAL, "name": "renamed"}).fingerprint() != changed.fingerprint()
    assert isinstance(spec, JobSpec)
