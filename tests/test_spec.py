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
    ({"hyperparameters": {"batch_size": "four"}}, 'hyperparameters.batch_size: must be an integer (got "four")'),
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


@pytest.mark.parametrize("override, problem", [
    ({"hyperparameters": {"max_steps": True}}, "hyperparameters.max_steps: must be an integer (got true)"),
    ({"hyperparameters": {"batch_size": 4.0}}, "hyperparameters.batch_size: must be an integer (got 4.0)"),
    ({"hyperparameters": {"lora_r": "16"}}, 'hyperparameters.lora_r: must be an integer (got "16")'),
    ({"gpu_config": {"num_gpus": False}}, "gpu_config.num_gpus: must be an integer (got false)"),
    ({"hyperparameters": {"learning_rate": True}}, "hyperparameters.learning_rate: must be a number (got true)"),
    ({"hyperparameters": {"learning_rate": "2e-4"}}, 'hyperparameters.learning_rate: must be a number (got "2e-4")'),
    ({"hyperparameters": {"packing": 1}}, "hyperparameters.packing: must be true or false (got 1)"),
    ({"hyperparameters": {"packing": "yes"}}, 'hyperparameters.packing: must be true or false (got "yes")'),
    ({"hyperparameters": {"max_grad_norm": float("inf")}}, "hyperparameters.max_grad_norm: must be a finite number"),
    ({"hyperparameters": {"lora_alpha": float("nan")}}, "hyperparameters.lora_alpha: must be a finite number"),
    ({"hyperparameters": {"max_grad_norm": 1e7}}, "hyperparameters.max_grad_norm: must be ≤ 1000000"),
    ({"hyperparameters": {"learning_rate": 10**400}}, "hyperparameters.learning_rate: must be a finite number (too large)"),
    ({"hyperparameters": {"save_steps": 10**400}}, "hyperparameters.save_steps: must be ≤ 10000000"),
    ({"hyperparameters": {"eval_steps": 2**63}}, "hyperparameters.eval_steps: must be ≤ 10000000"),
    ({"hyperparameters": {"seed": 2**64}}, "hyperparameters.seed: must be ≤ 4294967295"),
    ({"hyperparameters": 5}, "hyperparameters: must be a mapping of fields"),
    ({"name": 7}, "name: must be a string (got 7)"),
])
def test_types_are_strict_and_numbers_finite_and_bounded(override, problem):
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, **override})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_every_number_field_has_an_upper_bound():
    import annotated_types

    from usf_bios.spec import GpuConfig, Hyperparameters

    for model in (Hyperparameters, GpuConfig):
        for name, info in model.model_fields.items():
            if info.annotation in (int, float, int | None):
                assert any(isinstance(r, (annotated_types.Le, annotated_types.Lt)) for r in info.metadata), name


def test_json_numbers_past_int64_or_float_range_name_their_field(tmp_path):
    """As a request body or a .json spec: Python's json reads them (and Infinity); the spec refuses each."""
    body = ('{"name": "a", "base_model": "m", "dataset": "d", "hyperparameters": {"save_steps": 1' + "0" * 400 +
            ', "max_grad_norm": Infinity, "learning_rate": 1e400, "max_steps": true}}')
    (tmp_path / "spec.json").write_text(body)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "spec.json")
    assert info.value.problems == ["hyperparameters.max_steps: must be an integer (got true)",
                                   "hyperparameters.learning_rate: must be a finite number (got Infinity)",
                                   "hyperparameters.save_steps: must be ≤ 10000000",
                                   "hyperparameters.max_grad_norm: must be a finite number (got Infinity)"]


def test_yaml_floats_with_or_without_a_dot_and_ints_for_floats(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: a\nbase_model: m\ndataset: d\n"
                    "hyperparameters: {learning_rate: 2e-4, lora_alpha: 16, max_grad_norm: 1E1, weight_decay: 2.0e-2,"
                    " lora_dropout: 0, max_steps: 5, packing: no}\n")
    hp = load_spec(path).hyperparameters
    assert (hp.learning_rate, hp.lora_alpha, hp.max_grad_norm, hp.weight_decay) == (2e-4, 16.0, 10.0, 0.02)
    assert type(hp.lora_alpha) is float and hp.max_steps == 5 and hp.packing is False
    path.write_text("name: a\nbase_model: m\ndataset: d\nhyperparameters: {max_steps: 1e3}\n")
    with pytest.raises(SpecError, match=r"max_steps: must be an integer \(got 1000.0\)"):
        load_spec(path)
