"""The new-job form is built from the job spec: every field is there with its help and bounds, and the
the presets fill fields it has."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from usf_bios.spec import Hyperparameters, JobSpec
from usf_bios.presets import DEFAULT_PRESET
from usf_bios.web.forms import NOT_IN_FORM, form_presets, job_form
from usf_bios.web.render import TEMPLATES


def spec_paths(model: type[BaseModel] = JobSpec, prefix: str = "") -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            paths |= spec_paths(info.annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths - set(NOT_IN_FORM)


def test_every_spec_field_has_an_input_with_help():
    form = job_form()
    assert form.paths() == spec_paths()
    fields = [*form.top.values(), *form.main, form.quantization, *form.advanced, *(f for s in form.sections for f in s.fields)]
    assert all(f.help for f in fields), [f.path for f in fields if not f.help]
    html = TEMPLATES.env.get_template("new_job.html").render(
        form=form, presets=form_presets(), default_preset=DEFAULT_PRESET, chosen={"model": "", "dataset": ""},
        page="jobs", title="New job", auth_required=False, version="test")
    rendered = set(re.findall(r'<(?:input|select)[^>]*\sname="([\w.]+)"', html)) - {"preset", "key"}
    assert rendered == spec_paths()


@pytest.mark.parametrize(("path", "bounds"), [
    ("hyperparameters.lora_r", "1 – 1 024"),
    ("hyperparameters.learning_rate", "> 0, ≤ 1"),
    ("hyperparameters.lora_dropout", "≥ 0, < 1"),
    ("hyperparameters.eval_steps", "1 – 10 000 000"),
    ("hyperparameters.max_grad_norm", "> 0, ≤ 1 000 000"),
    ("hyperparameters.max_steps", "1 – 10 000 000"),
    ("gpu_config.num_gpus", "0 – 64"),
    ("hyperparameters.packing", ""),
])
def test_bounds_are_the_specs(path, bounds):
    form = job_form()
    fields = {f.path: f for f in [*form.main, *form.advanced, *(f for s in form.sections for f in s.fields)]}
    assert fields[path].bounds == bounds


def test_field_kinds_and_defaults_come_from_the_spec():
    form = job_form()
    fields = {f.path: f for f in [*form.top.values(), *form.main, *form.advanced, form.quantization]}
    assert fields["hyperparameters.max_steps"].optional and fields["hyperparameters.max_steps"].html_default == ""
    assert fields["hyperparameters.learning_rate"].kind == "float" and fields["hyperparameters.learning_rate"].html_default == "0.0002"
    assert fields["hyperparameters.precision"].choices == ("auto", "bf16", "fp16", "fp32")
    assert fields["hyperparameters.quantization"].choices == ("none", "4bit", "8bit")
    assert fields["name"].required and fields["name"].pattern and fields["name"].html_default == ""
    assert fields["hyperparameters.target_modules"].kind == "text"


def test_the_default_preset_is_the_spec_default():
    presets = form_presets()
    defaults = Hyperparameters().model_dump()
    assert all(defaults[k.split(".", 1)[1]] == v for k, v in presets[DEFAULT_PRESET]["fields"].items())
    assert presets["any_lora-quick"]["fields"]["hyperparameters.lora_r"] < presets["any_lora-thorough"]["fields"]["hyperparameters.lora_r"]
    assert all(p["label"] and p["summary"] for p in presets.values())
