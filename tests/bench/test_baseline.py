"""The Hugging Face baseline on the CPU with the tiny random Llama: real Trainer, real peft, no mocks."""

import math

import pytest
import torch

from usf_bios.bench.baseline import PadToLongest, run_baseline
from usf_bios.bench.configs import get_config
from usf_bios.bench.models import build_model
from usf_bios.bench.synthetic import synthetic_examples
from usf_bios.engine.data import IGNORE

CFG = get_config("tiny-llama-lora-fp32-256")


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = build_model(CFG.model, CFG.quantization, torch.device("cpu"), torch.float32)
    examples = synthetic_examples(CFG.num_examples + 5, CFG.seq_len, vocab_size=512, seed=CFG.seed)
    return model, examples, run_baseline(model, examples, CFG, pad_id=0)


def test_runs_every_step_and_counts_the_timed_tokens(run):
    _, examples, measured = run
    per_step = CFG.examples_per_step
    assert len(measured.step_seconds) == CFG.steps and all(s > 0 for s in measured.step_seconds)
    assert measured.step_tokens == [sum(len(e.input_ids) for e in examples[k * per_step:(k + 1) * per_step])
                                    for k in range(CFG.steps)]
    timed = examples[CFG.warmup_steps * per_step:CFG.num_examples]
    timed_seconds = sum(measured.step_seconds[CFG.warmup_steps:])
    assert measured.tokens_per_second == pytest.approx(sum(len(e.input_ids) for e in timed) / timed_seconds)
    assert measured.peak_memory_gb == 0.0


def test_losses_are_finite_and_logged_every_step(run):
    _, _, measured = run
    assert len(measured.losses) == CFG.steps
    assert all(math.isfinite(x) for x in measured.losses)
    assert measured.losses[0] == pytest.approx(math.log(512), rel=0.05)  # random tokens: about ln(vocab)


def test_only_lora_weights_train(run):
    model, _, _ = run
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-3] for name in trainable} == {"lora_A", "lora_B"}  # <module>.lora_A.default.weight
    targeted = {name.split(".lora_")[0].split(".")[-1] for name in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_collator_pads_to_the_longest_and_records_the_order():
    collate = PadToLongest(pad_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "index": 4}, {"input_ids": [5], "index": 5}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [5, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert collate.seen == [[4, 5]] and collate.real_tokens == [4]


def test_trainer_takes_the_examples_in_order(tmp_path):
    from transformers import TrainingArguments

    from usf_bios.bench.baseline import _trainer_class

    dataset = [{"input_ids": [i], "index": i} for i in range(50)]
    trainer = _trainer_class()(model=torch.nn.Linear(1, 1), train_dataset=dataset,
                               args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    assert list(trainer._get_train_sampler()) == list(range(50))
    assert list(trainer._get_train_sampler(dataset[:3])) == [0, 1, 2]


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match="need"):
        run_baseline(torch.nn.Linear(1, 1), [], CFG)


def test_4bit_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        build_model("tiny-llama", "4bit", torch.device("cpu"), torch.bfloat16)
