"""The new-job form, built from the job spec itself: every field's help text, default and bounds come from
``usf_bios.spec``, so the form cannot drift from what the API accepts. Presets (usf_bios/presets/*.yaml) fill the
fields they set."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from usf_bios.spec import Hyperparameters, JobSpec

Kind = Literal["int", "float", "bool", "choice", "text"]

# Shown without opening "All hyperparameters"; the rest are grouped below them.
MAIN_FIELDS = ("num_epochs", "max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps",
               "max_seq_length", "lora_r", "lora_alpha")
QUANTIZATION_FIELD = "quantization"   # rendered as the QLoRA toggle


@dataclass(frozen=True)
class FormField:
    """One input: ``path`` is its place in the spec (``hyperparameters.lora_r``), the error key the API uses."""

    path: str
    label: str
    kind: Kind
    default: Any
    help: str
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False
    pattern: str | None = None        # a regular expression the whole value must match
    max_length: int | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def input_id(self) -> str:
        return "f-" + self.path.replace(".", "-").replace("_", "-")

    @property
    def bounds(self) -> str:
        """'1 – 1000', '> 0, ≤ 1', '≥ 1'; empty when unbounded."""
        if self.minimum is None and self.maximum is None:
            return ""
        low = None if self.minimum is None else _number(self.minimum)
        high = None if self.maximum is None else _number(self.maximum)
        if low is not None and high is not None and not self.min_exclusive and not self.max_exclusive:
            return f"{low} – {high}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.min_exclusive else '≥'} {low}")
        if high is not None:
            parts.append(f"{'<' if self.max_exclusive else '≤'} {high}")
        return ", ".join(parts)

    @property
    def html_min(self) -> str:
        return "" if self.minimum is None else _number(self.minimum, plain=True)

    @property
    def html_max(self) -> str:
        return "" if self.maximum is None else _number(self.maximum, plain=True)

    @property
    def html_default(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, float):
            return _number(self.default, plain=True)
        return str(self.default)


def _number(value: float, plain: bool = False) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value)) if plain else f"{int(value):,}".replace(",", " ")
    return repr(float(value))


def _label(name: str) -> str:
    words = name.replace("_", " ")
    special = {"lora r": "LoRA rank (r)", "lora alpha": "LoRA alpha", "lora dropout": "LoRA dropout",
               "lr scheduler": "LR schedule", "max seq length": "Max sequence length", "num epochs": "Epochs",
               "num gpus": "GPUs", "gpu type": "GPU type", "val split": "Validation split",
               "max grad norm": "Max gradient norm", "gradient accumulation steps": "Gradient accumulation"}
    return special.get(words, words[:1].upper() + words[1:])


def _field(path: str, info: FieldInfo) -> FormField:
    annotation = info.annotation
    args = typing.get_args(annotation)
    optional = type(None) in args
    kind: Kind
    choices: tuple[str, ...] = ()
    if typing.get_origin(annotation) is Literal:
        kind, choices = "choice", tuple(str(a) for a in args)
    elif annotation is bool:
        kind = "bool"
    elif annotation is int or (optional and int in args):
        kind = "int"
    elif annotation is float:
        kind = "float"
    else:
        kind = "text"   # strings, and target_modules ('all-linear' or a comma-separated list)
    bounds: dict[str, Any] = {}
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Ge):
            bounds["minimum"] = rule.ge
        elif isinstance(rule, annotated_types.Gt):
            bounds.update(minimum=rule.gt, min_exclusive=True)
        elif isinstance(rule, annotated_types.Le):
            bounds["maximum"] = rule.le
        elif isinstance(rule, annotated_types.Lt):
            bounds.update(maximum=rule.lt, max_exclusive=True)
        elif isinstance(rule, annotated_types.MaxLen):
            bounds["max_length"] = rule.max_length
        elif getattr(rule, "pattern", None):
            bounds["pattern"] = rule.pattern
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    return FormField(path=path, label=_label(path.rsplit(".", 1)[-1]), kind=kind, default=default,
                     help=info.description or "", optional=optional, choices=choices, required=required, **bounds)


@dataclass(frozen=True)
class Section:
    """A group of the spec (``gpu_config``, ``performance``, …) shown as its own card."""

    key: str
    title: str
    help: str
    fields: list[FormField]


@dataclass(frozen=True)
class JobForm:
    top: dict[str, FormField]          # name, dataset_format, trust_remote_code
    main: list[FormField]              # the hyperparameters a preset changes most
    quantization: FormField
    advanced: list[FormField]          # every other hyperparameter
    sections: list[Section]            # every other group of the spec: hardware first

    def paths(self) -> set[str]:
        """Every spec path the form has an input for (base_model and dataset are the pickers)."""
        fields = [*self.top.values(), *self.main, self.quantization, *self.advanced,
                  *(f for section in self.sections for f in section.fields)]
        return {f.path for f in fields} | {"base_model", "dataset"}


SECTION_TITLES = {"gpu_config": "Hardware"}
PICKED = ("base_model", "dataset")   # chosen from the registered models and datasets, not typed
# given in a YAML or JSON spec (CLI, REST), not in the form yet: a mixture of datasets, the metric tools
NOT_IN_FORM = ("datasets", "report_to")


def _group(name: str) -> type[BaseModel] | None:
    annotation = JobSpec.model_fields[name].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def job_form() -> JobForm:
    hyper = {name: _field(f"hyperparameters.{name}", info) for name, info in Hyperparameters.model_fields.items()}
    top = {name: _field(name, info) for name, info in JobSpec.model_fields.items()
           if name not in PICKED + NOT_IN_FORM and _group(name) is None}
    groups = [name for name in JobSpec.model_fields if name != "hyperparameters" and _group(name) is not None]
    groups.sort(key=lambda name: name != "gpu_config")
    sections = []
    for name in groups:
        model = _group(name)
        assert model is not None
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        sections.append(Section(key=name, title=SECTION_TITLES.get(name, _label(name)), help=doc,
                                fields=[_field(f"{name}.{field}", info) for field, info in model.model_fields.items()]))
    return JobForm(
        top=top,
        main=[hyper[name] for name in MAIN_FIELDS],
        quantization=hyper[QUANTIZATION_FIELD],
        advanced=[f for name, f in hyper.items() if name not in MAIN_FIELDS and name != QUANTIZATION_FIELD],
        sections=sections,
    )


def form_presets() -> dict[str, dict[str, Any]]:
    """The preset files (usf_bios/presets) as the form applies them: each group's fields by their spec path; the
    base model stays as picked."""
    from usf_bios.presets import load_presets

    return {name: {"label": p.label, "summary": p.summary, "command": p.command,
                   "fields": {f"{group}.{key}": value for group, values in p.fields.items() if isinstance(values, dict)
                              for key, value in values.items()}}
            for name, p in load_presets().items()}
