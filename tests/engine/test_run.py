"""A whole job on a tiny model: the files it leaves, its events, and the failures it reports."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.run import run_job
from usf_bios.spec import parse_spec


def make_spec(model: str, dataset, **hp) -> dict:
    hyper = dict(num_epochs=2, learning_rate=1e-2, batch_size=4, gradient_accumulation_steps=2, max_seq_length=128,
                 lora_r=4, lora_alpha=8, val_split=0.2, eval_steps=2, save_steps=3, precision="fp32")
    hyper.update(hp)
    return {"name": "tiny-job", "base_model": model, "dataset": str(dataset), "hyperparameters": hyper,
            "gpu_config": {"num_gpus": 0}}


def test_completed_job_leaves_every_file_and_plain_peft_loads_the_adapter(layout, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    spec = parse_spec(make_spec(tiny_model, dataset))
    job_id = create_job(spec, layout)
    result = run_job(job_id, layout)
    assert result.status == "completed", result.error
    out = layout.job_output(job_id)
    for name in ("job.yaml", "adapter_config.json", "adapter_model.safetensors", "training_args.json",
                 "training_log.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "job.yaml").read_text()) == spec.model_dump(mode="json")

    # 32 training examples packed into rows of 128 tokens, 4 rows a micro-batch, 2 micro-batches a step, 2 epochs
    events = event_dicts(layout.job_events(job_id))
    metrics = [e for e in events if e["type"] == "metric"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["train_examples"] == 32 and args["validation_examples"] == 8
    assert len(metrics) == args["total_steps"] and [m["step"] for m in metrics] == list(range(1, args["total_steps"] + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "gpu_memory_gb"} <= set(metrics[0])
    assert [e["stage"] for e in events if e["type"] == "stage"][:3] == ["loading_model", "tokenizing", "training"]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [s for s in range(1, args["total_steps"] + 1)
                                         if s % 2 == 0 or s == args["total_steps"]]
    assert events[-1] == {**events[-1], "type": "done", "status": "completed", "error": None}
    log = json.loads((out / "training_log.json").read_text())
    assert [p["step"] for p in log] == [m["step"] for m in metrics] and "validation_loss" in log[1]
    card = (out / "README.md").read_text()
    assert tiny_model in card and "PeftModel.from_pretrained" in card and f"{metrics[-1]['loss']:.4f}" in card

    base_path = layout.models / tiny_model
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(tuned(ids).logits, before, atol=1e-4)  # the adapter changes the model


def test_max_steps_wins_over_num_epochs(layout, tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    job_id = create_job(parse_spec(make_spec(tiny_model, dataset, num_epochs=1, max_steps=7, batch_size=1,
                                             gradient_accumulation_steps=1, packing=False, val_split=0.0)), layout)
    assert run_job(job_id, layout).status == "completed"
    metrics = [e for e in event_dicts(layout.job_events(job_id)) if e["type"] == "metric"]
    assert len(metrics) == 7
    assert not any(e["type"] == "eval" for e in event_dicts(layout.job_events(job_id)))


@pytest.mark.parametrize("change, message", [
    ({"hyperparameters": {"quantization": "4bit"}}, "quantization: 4bit needs a CUDA GPU"),
    ({"gpu_config": {"num_gpus": 1}}, "no CUDA GPU is visible"),
    ({"base_model": "nobody--missing-model"}, "model 'nobody--missing-model' not found"),
    ({"dataset": "not-registered"}, "dataset 'not-registered' not found"),
    ({"hyperparameters": {"target_modules": ["no_such_proj"]}}, "target_modules"),
])
def test_failures_end_the_job_failed_with_a_clear_reason(layout, tiny_model, tmp_path, change, message):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    spec = make_spec(tiny_model, dataset)
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    job_id = create_job(parse_spec(spec), layout)
    result = run_job(job_id, layout)
    assert result.status == "failed" and message in result.error
    done = event_dicts(layout.job_events(job_id))[-1]
    assert done["type"] == "done" and done["status"] == "failed" and message in done["error"]
    assert "Traceback" in layout.job_log(job_id).read_text()


def test_a_broken_dataset_fails_before_training_with_its_line(layout, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n')
    job_id = create_job(parse_spec(make_spec(tiny_model, bad)), layout)
    result = run_job(job_id, layout)
    assert result.status == "failed" and "bad.jsonl:2:" in result.error and "empty" in result.error
    assert not any(e["type"] == "metric" for e in event_dicts(layout.job_events(job_id)))


def test_model_folder_missing_pieces_are_named(layout, tiny_model, tmp_path):
    (layout.models / tiny_model / "model.safetensors").unlink()
    (layout.models / tiny_model / "tokenizer.json").unlink()
    (layout.models / tiny_model / "tokenizer_config.json").unlink()
    job_id = create_job(parse_spec(make_spec(tiny_model, write_jsonl(tmp_path / "c.jsonl", chat_rows(4)))), layout)
    result = run_job(job_id, layout)
    assert result.status == "failed"
    assert "no weights" in result.error and "no tokenizer files" in result.error


def test_pytorch_bin_weights_load_through_weights_only(layout, tiny_model, tmp_path):
    from safetensors.torch import load_file

    folder = layout.models / tiny_model
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    job_id = create_job(parse_spec(make_spec(tiny_model, data, max_steps=2, val_split=0.0)), layout)
    result = run_job(job_id, layout)
    assert result.status == "completed", result.error
