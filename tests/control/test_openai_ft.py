"""From an OpenAI fine-tuning request to a JobSpec: "auto" values from the file's size, batch_size as micro-batches
times accumulation, the learning rate from the multiplier, the usf extras, what is refused; the status map."""

from __future__ import annotations

import pytest

from usf_bios.control.errors import Invalid
from usf_bios.control.openai_ft import (BASE_LEARNING_RATE, STATUS, FineTuneCreate, auto_batch_size, auto_epochs,
                                        build_spec)
from usf_bios.control.tables import DatasetEntry
from usf_bios.status import JobStatus


def dataset(rows: int) -> DatasetEntry:
    return DatasetEntry(id="abc123", name="d", filename="d.jsonl", path="/x", format="messages", rows=rows,
                        size_bytes=1, sha256="0")


def spec_for(rows: int = 100, gpus: int = 0, **body):
    return build_spec(FineTuneCreate(model="m", training_file="abc123", **body), model_name="smollm2",
                      dataset=dataset(rows), gpus=gpus)


def test_auto_values_follow_the_files_size():
    assert [auto_epochs(n) for n in (10, 16, 40, 1000, 20_000)] == [10, 7, 3, 3, 1]
    assert [auto_batch_size(n) for n in (16, 1000, 4000, 100_000)] == [1, 2, 8, 32]
    spec = spec_for(16)
    assert spec.hyperparameters.num_epochs == 7 and spec.hyperparameters.batch_size == 1
    assert spec.hyperparameters.learning_rate == BASE_LEARNING_RATE
    assert spec.name == "ft-smollm2" and spec.dataset == "abc123" and spec.gpu_config.num_gpus == 0
    assert spec.hyperparameters.precision == "fp32"
    assert spec_for(gpus=2).gpu_config.num_gpus == 1 and spec_for(gpus=1).hyperparameters.precision == "auto"


def test_given_values_map_onto_the_spec():
    spec = spec_for(hyperparameters={"n_epochs": 2, "batch_size": 12, "learning_rate_multiplier": 5}, seed=9,
                    suffix="my bot!")
    h = spec.hyperparameters
    assert (h.num_epochs, h.batch_size, h.gradient_accumulation_steps, h.seed) == (2, 6, 2, 9)
    assert h.learning_rate == pytest.approx(1e-3) and spec.name == "my-bot"
    method = spec_for(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}})
    assert method.hyperparameters.num_epochs == 4
    extra = spec_for(hyperparameters={"n_epochs": 2}, usf={"hyperparameters": {"max_steps": 5, "lora_r": 8}})
    assert (extra.hyperparameters.max_steps, extra.hyperparameters.lora_r, extra.hyperparameters.num_epochs) == (5, 8, 2)


def test_what_cannot_be_used_is_refused_naming_the_field():
    with pytest.raises(Invalid, match="validation_file"):
        spec_for(validation_file="other")
    with pytest.raises(Invalid) as bad:
        spec_for(usf={"hyperparameters": {"lora_r": 0}})
    assert bad.value.field == "hyperparameters.lora_r"
    with pytest.raises(Invalid, match="usf.name"):
        spec_for(usf={"name": "x"})
    with pytest.raises(ValueError):
        FineTuneCreate(model="m", training_file="f", hyperparameters={"n_epochs": 0})


def test_every_status_has_an_openai_name():
    assert set(STATUS) == set(JobStatus)
    assert STATUS[JobStatus.COMPLETED] == "succeeded" and STATUS[JobStatus.PREPARING] == "running"
    assert set(STATUS.values()) <= {"validating_files", "queued", "running", "succeeded", "failed", "cancelled"}
