"""Several datasets with sampling weights (``datasets: [{name, weight}]``): the spec's rules, the engine's exact
sampling, a fault's file and line, and that one plain ``dataset`` trains and hashes as before."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import chat_rows, write_jsonl
from usf_bios.engine.data import split_indices, weigh_training, weighted_take
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.run import run_job
from usf_bios.spec import SpecError, parse_spec

BASE = {"name": "mix", "base_model": "m"}


def test_the_spec_takes_one_form_and_names_each_fault():
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "dataset": "a", "datasets": [{"name": "b"}]})
    assert info.value.problems == ["datasets: give dataset or datasets, not both"]
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "datasets": [{"name": "a", "weight": 0}, {"weight": 2}, {"name": "c", "share": 1}]})
    assert info.value.problems == ["datasets.0.weight: must be > 0.0", "datasets.1.name: required",
                                   "datasets.2.share: unknown field"]
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "datasets": [{"name": "a", "weight": True}]})
    assert info.value.problems[0].startswith("datasets.0.weight: must be a number")
    spec = parse_spec({**BASE, "datasets": [{"name": "a", "weight": 2}, {"name": "b"}]})
    assert spec.dataset_refs() == [("a", 2.0), ("b", 1.0)] and spec.dataset is None


def test_a_plain_dataset_hashes_as_before_mixtures_existed():
    """A checkpoint written before ``datasets`` and ``report_to`` existed must still resume: its fingerprint is
    the hash of the spec without those fields."""
    spec = parse_spec({**BASE, "dataset": "a.jsonl", "report_to": ["tensorboard"]})
    # the gpu_config fields of several ranks did not exist either (a checkpoint records its world size itself)
    old = spec.model_dump(mode="json", exclude={"name": True, "performance": True,
                                                "gpu_config": {"executor", "strategy", "num_processes", "num_nodes"},
                                                "datasets": True, "report_to": True})
    assert spec.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    mixed = parse_spec({**BASE, "datasets": [{"name": "a.jsonl", "weight": 1.5}]})
    heavier = parse_spec({**BASE, "datasets": [{"name": "a.jsonl", "weight": 2}]})
    assert len({spec.fingerprint(), mixed.fingerprint(), heavier.fingerprint()}) == 3   # a weight is what is learned


def test_weights_sample_exactly_and_keep_validation_apart():
    assert weighted_take(10, 2.5, seed=1).count(3) in (2, 3) and len(weighted_take(10, 2.5, seed=1)) == 25
    assert len(weighted_take(7, 0.5, seed=1)) == 4 and weighted_take(7, 0.5, 1) == weighted_take(7, 0.5, 1)
    sources = [0] * 30 + [1] * 20
    val, train = split_indices(50, 0.2, seed=3)
    weighted = weigh_training(train, sources, [2.0, 0.5], seed=3)
    train_a = [i for i in train if sources[i] == 0]
    train_b = [i for i in train if sources[i] == 1]
    assert sum(1 for i in weighted if sources[i] == 0) == 2 * len(train_a)
    assert sum(1 for i in weighted if sources[i] == 1) == round(0.5 * len(train_b))
    assert not set(weighted) & set(val)


def _spec(model: str, datasets: list[dict]) -> dict:
    return {"name": "mix", "base_model": model, "datasets": datasets, "gpu_config": {"num_gpus": 0},
            "hyperparameters": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                                "max_seq_length": 128, "lora_r": 4, "lora_alpha": 8, "val_split": 0.25,
                                "eval_steps": 2, "save_steps": 2, "precision": "fp32"}}


def test_a_mixture_trains_each_dataset_at_its_weight(layout, tiny_model, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", chat_rows(20))
    second = write_jsonl(tmp_path / "second.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i}"} for i in range(12)])
    spec = parse_spec(_spec(tiny_model, [{"name": str(first), "weight": 2}, {"name": str(second), "weight": 0.5}]))
    job_id = create_job(spec, layout)
    result = run_job(job_id, layout)
    assert result.status == "completed", result.error
    # the engine's split of the 32 examples, then 2 × the first file's training share + half the second's
    sources = [0] * 20 + [1] * 12
    val, train = split_indices(32, 0.25, seed=42)
    expected = 2 * sum(1 for i in train if sources[i] == 0) + round(0.5 * sum(1 for i in train if sources[i] == 1))
    args = json.loads((layout.job_output(job_id) / "training_args.json").read_text())
    assert args["train_examples"] == expected and args["validation_examples"] == len(val) == 8
    assert args["dataset_format"] == "messages, prompt_completion"
    assert args["datasets"] == [{"name": str(first), "weight": 2.0}, {"name": str(second), "weight": 0.5}]
    log = layout.job_log(job_id).read_text()
    assert "datasets: first.jsonl × 2, second.jsonl × 0.5" in log
    card = (layout.job_output(job_id) / "README.md").read_text()
    assert f"`{first}` × 2" in card and f"`{second}` × 0.5" in card


def test_a_bad_row_in_any_dataset_names_its_file_and_line(layout, tiny_model, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    job_id = create_job(parse_spec(_spec(tiny_model, [{"name": str(good)}, {"name": str(bad)}])), layout)
    result = run_job(job_id, layout)
    assert result.status == "failed" and f"{bad}:2" in (result.error or ""), result.error
    missing = create_job(parse_spec(_spec(tiny_model, [{"name": str(good)}, {"name": "nowhere"}])), layout)
    result = run_job(missing, layout)
    assert result.status == "failed" and "dataset 'nowhere' not found" in (result.error or ""), result.error
