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
