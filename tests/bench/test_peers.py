"""The peers' pieces that run without a GPU: the labels and masks they are fed, the rows they train (ours), and
the runner where Unsloth is absent."""

from __future__ import annotations

import json

import pytest
import torch

from usf_bios.bench.configs import get_config, workload_config
from usf_bios.bench.ours import plan_rows, step_rows
from usf_bios.bench.peers import attention_mask, hf_labels, padded_batch, unsloth_missing
from usf_bios.bench.runner import baseline_sides, run_bench
from usf_bios.bench.synthetic import synthetic_examples, workload_examples
from usf_bios.engine.data import IGNORE, TokenizedExample
from usf_bios.spec import Performance

CFG = get_config("tiny-llama-lora-fp32-256")


def _example(ids: list[int]) -> TokenizedExample:
    return TokenizedExample(ids, ids[1:] + [IGNORE], False, 1)


def test_labels_train_the_same_tokens_as_our_targets():
    rows = [[_example([5, 6, 7]), _example([8, 9])]]
    from usf_bios.engine.data import collate

    batch = collate(rows, pad_id=0)
    labels = hf_labels(batch.targets)
    # the model predicts labels[t + 1] at t: the same pairs as our targets[t], none across the examples' boundary
    shifted = labels[:, 1:]
    assert shifted.tolist() == [batch.targets[0, :-1].tolist()]
    assert labels.tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert int((labels != IGNORE).sum()) == int((batch.targets != IGNORE).sum())


def test_attention_mask_covers_each_example_and_not_its_padding():
    batch = padded_batch([_example([1, 2, 3, 4]), _example([5, 6]), _example([7, 8, 9])])
    assert attention_mask(batch).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert int(attention_mask(batch).sum()) == batch.real_tokens


def test_peers_train_our_rows_in_our_order():
    examples = synthetic_examples(CFG.num_examples, CFG.seq_len, 512, CFG.seed)
    data, accumulation, steps = plan_rows(examples, CFG)
    by_step = step_rows(examples, CFG)
    assert len(by_step) == steps and all(len(s) == accumulation for s in by_step)
    order = data.epoch_order(0)
    flat = [b for s in by_step for b in s]
    for index, batch in enumerate(flat):
        row = data.train_rows[order[index]]
        assert batch.input_ids.shape[0] == 1
        assert batch.input_ids[0].tolist() == [t for ex in row for t in ex.input_ids]


def test_model_folder_loads_back_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from usf_bios.bench.models import build_model
    from usf_bios.bench.peers import save_model_folder

    torch.manual_seed(0)
    model = build_model(CFG.model, "none", torch.device("cpu"), torch.float32)
    folder = save_model_folder(model, tmp_path / "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert len(tokenizer) <= model.config.vocab_size and tokenizer.pad_token_id == 3
    assert save_model_folder(model, folder) == folder  # kept, not written again


def test_full_rows_workload():
    cfg = workload_config(CFG, "full-rows")
    assert cfg.examples_per_step == 4 and cfg.examples_per_step % cfg.baseline_micro_batch == 0
    examples = workload_examples("full-rows", cfg.num_examples, cfg.seq_len, 512, cfg.seed)
    assert {len(e.input_ids) for e in examples} == {cfg.seq_len}
    by_step = step_rows(examples, cfg)
    assert [len(s) for s in by_step] == [4] * cfg.steps
    assert all(b.real_tokens == cfg.seq_len for s in by_step for b in s)
    with pytest.raises(ValueError, match="unknown workload"):
        workload_config(CFG, "padded")


def test_baseline_sides():
    assert baseline_sides(("hf",)) == ("hf",)
    assert baseline_sides(("unsloth", "hf-best")) == ("hf-best", "unsloth", "unsloth-nockpt")
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_sides(("axolotl",))
    with pytest.raises(ValueError, match="pick one"):
        baseline_sides(("hf", "hf-best"))


@pytest.mark.skipif(unsloth_missing() is None, reason="Unsloth is installed here")
def test_the_bench_runs_and_reports_where_unsloth_is_absent(tmp_path):
    path = run_bench([CFG.name], out_dir=tmp_path, performance=Performance(), timeout=600, sides=("baseline", "ours"),
                     baselines=("unsloth",), log=lambda line: None)
    report = json.loads(path.read_text())
    (row,) = report["results"]
    assert row["workload"] == "packed" and row["tokens_per_second"] > 0
    assert row["unsloth_tokens_per_second"] is None and row["speedup_vs_unsloth"] is None
    assert row["unsloth_peak_memory_gb"] is None and "not installed" in row["unsloth_error"]
    assert row["baseline"] is None and row["baseline_tokens_per_second"] is None
    assert report["baselines"] == ["unsloth"]


def test_the_card_size_reaches_every_side(tmp_path):
    """--gpu-memory is passed to each side's worker; on the CPU each refuses it by name, and the report says so."""
    path = run_bench([CFG.name], out_dir=tmp_path, performance=Performance(), timeout=600, sides=("baseline", "ours"),
                     baselines=("hf-best",), gpu_memory_gb=85.5, log=lambda line: None)
    report = json.loads(path.read_text())
    assert report["results"] == [] and report["gpu_memory_gb"] == 85.5
    (failed,) = report["failed"]
    assert failed["errors"] == {"hf-best": "ValueError: --gpu-memory-gb needs a GPU",
                                "ours": "ValueError: --gpu-memory-gb needs a GPU"}


def test_unknown_workloads_fail_before_any_side_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        run_bench([CFG.name], out_dir=tmp_path, performance=Performance(), workloads=("padded",), log=lambda line: None)
