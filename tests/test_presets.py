"""Presets are partial job specs in usf_bios/presets/<model>_<method>.yaml, read the same way by the CLI, the API
and the form."""

from __future__ import annotations

import re

import pytest
import yaml

from usf_bios.presets import DEFAULT_PRESET, FOLDER, PresetError, _read, get_preset, load_presets
from usf_bios.spec import parse_spec

NAME = re.compile(r"^[a-z0-9.-]+_[a-z0-9.-]+$")   # <model>_<method>


@pytest.mark.parametrize("name", sorted(load_presets()))
def test_every_preset_is_a_partial_spec_with_its_command_and_a_comment_per_key(name):
    preset = get_preset(name)
    assert NAME.match(name) and preset.label and preset.summary
    assert preset.command == f"usf-bios train --preset {name} job.yaml"
    spec = parse_spec(preset.apply({"name": "x", "base_model": "m", "dataset": "d"}))   # raises on a bad field
    assert spec.name == "x"
    for line in (FOLDER / f"{name}.yaml").read_text().splitlines():
        if line.strip() and not line.startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{name}: no comment on {line.strip()!r}"


def test_a_jobs_own_fields_win_over_the_preset():
    merged = get_preset("llama3.1-8b_qlora").apply({"name": "x", "base_model": "mine", "dataset": "d",
                                                    "hyperparameters": {"lora_r": 64}})
    spec = parse_spec(merged)
    assert spec.base_model == "mine" and spec.hyperparameters.lora_r == 64
    assert spec.hyperparameters.quantization == "4bit" and spec.hyperparameters.max_seq_length == 4096


def test_unknown_presets_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(PresetError, match="no preset 'nope'.*any_lora"):
        get_preset("nope")
    bad = tmp_path / "x_lora.yaml"
    bad.write_text(yaml.safe_dump({"hyperparameters": {"lora_r": 8}}))
    with pytest.raises(PresetError, match="Label: summary"):
        _read(bad)
    assert next(iter(load_presets())) == DEFAULT_PRESET


def test_a_spec_file_loads_on_top_of_a_preset_and_the_cli_refuses_an_unknown_one(tmp_path):
    import subprocess
    import sys

    from usf_bios.spec import load_spec

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("name: mine\nbase_model: m\ndataset: d\nhyperparameters: {lora_r: 4}\n")
    spec = load_spec(spec_file, "smollm2-135m_lora-cpu")
    assert spec.hyperparameters.lora_r == 4 and spec.hyperparameters.max_seq_length == 512
    assert spec.gpu_config.num_gpus == 0 and spec.base_model == "m"
    result = subprocess.run([sys.executable, "-m", "usf_bios", "train", "--preset", "nope", str(spec_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no preset 'nope'" in result.stderr


def test_a_spec_of_datasets_replaces_a_presets_dataset_and_back():
    from usf_bios.presets import Preset

    preset = Preset("p", "P", "a preset", "usf-bios train --preset p job.yaml",
                    {"dataset": "preset.jsonl", "hyperparameters": {"lora_r": 8}})
    mixed = preset.apply({"name": "x", "base_model": "m", "datasets": [{"name": "a.jsonl", "weight": 2}]})
    assert "dataset" not in mixed and parse_spec(mixed).dataset_refs() == [("a.jsonl", 2.0)]
    assert parse_spec(mixed).hyperparameters.lora_r == 8
    plain = Preset("q", "Q", "s", "c", {"datasets": [{"name": "b.jsonl"}]}).apply({"name": "x", "base_model": "m",
                                                                                 "dataset": "c.jsonl"})
    assert parse_spec(plain).dataset_refs() == [("c.jsonl", 1.0)]
