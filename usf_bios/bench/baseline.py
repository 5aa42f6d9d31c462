"""The baseline: LoRA the Hugging Face way (peft + transformers.Trainer), padded micro-batches, timed per step.

Both sides see the same examples per optimizer step: step k trains on examples[k*E:(k+1)*E] (E =
examples_per_step), in order. Our synthetic targets are already shifted; here the labels are the input ids and
the model's loss shifts them, so the same tokens are trained.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import SequentialSampler

from usf_bios.bench.configs import BenchConfig
from usf_bios.bench.measure import Measurement, summarize
from usf_bios.engine.data import IGNORE, TokenizedExample


class PadToLongest:
    """Collate a micro-batch padded to its longest example; remembers, per micro-batch, which examples it held
    and how many real (non-padding) tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.seen: list[list[int]] = []
        self.real_tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for f in features:
            ids, pad = f["input_ids"], width - len(f["input_ids"])
            input_ids.append(ids + [self.pad_id] * pad)
            labels.append(ids + [IGNORE] * pad)
            attention.append([1] * len(ids) + [0] * pad)
        self.seen.append([f["index"] for f in features])
        self.real_tokens.append(sum(len(f["input_ids"]) for f in features))
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(attention)}


def _step_recorder(cuda: bool) -> Any:
    """A TrainerCallback timing each optimizer step (on_step_begin to on_step_end) and keeping each logged loss."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepRecorder()


def _trainer_class() -> Any:
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        """Trainer that keeps the dataset's order (no shuffling), so step k sees the same examples as ours."""

        def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return InOrderTrainer


def _training_arguments(cfg: BenchConfig, output_dir: str, cuda: bool) -> Any:
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing* (old names deprecated)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.baseline_micro_batch,
        gradient_accumulation_steps=cfg.examples_per_step // cfg.baseline_micro_batch,
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        seed=cfg.seed,
        **{checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": False}},
    )


def run_baseline(model: Any, examples: list[TokenizedExample], cfg: BenchConfig, *, pad_id: int = 0) -> Measurement:
    """Train ``model`` (from ``models.build_model``; adapters are added to it in place) for cfg.steps optimizer
    steps with Trainer + peft LoRA and return what was measured; the first cfg.warmup_steps are not timed."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import PrinterCallback

    needed, per_step = cfg.num_examples, cfg.examples_per_step
    if len(examples) < needed:
        raise ValueError(f"{cfg.name}: {cfg.steps} steps of {per_step} examples need {needed} examples, "
                         f"got {len(examples)}")
    examples = examples[:needed]
    cuda = next(model.parameters()).device.type == "cuda"

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lora)

    dataset = [{"input_ids": list(ex.input_ids), "index": i} for i, ex in enumerate(examples)]
    collator = PadToLongest(pad_id)
    recorder = _step_recorder(cuda)
    with tempfile.TemporaryDirectory(prefix="usf-bench-baseline-") as output_dir:
        trainer = _trainer_class()(model=model, args=_training_arguments(cfg, output_dir, cuda),
                                   train_dataset=dataset, data_collator=collator, callbacks=[recorder])
        trainer.remove_callback(PrinterCallback)  # the recorder keeps the losses; no log line per step
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0

    if [i for batch in collator.seen for i in batch] != list(range(needed)):
        raise RuntimeError(f"{cfg.name}: the Trainer did not take the examples in order")
    if len(recorder.seconds) != cfg.steps:
        raise RuntimeError(f"{cfg.name}: {len(recorder.seconds)} optimizer steps ran, expected {cfg.steps}")
    accumulation = per_step // cfg.baseline_micro_batch
    step_tokens = [sum(collator.real_tokens[k * accumulation:(k + 1) * accumulation]) for k in range(cfg.steps)]
    return Measurement(tokens_per_second=summarize(recorder.seconds, step_tokens, cfg.warmup_steps),
                       peak_memory_gb=peak, step_seconds=recorder.seconds, step_tokens=step_tokens,
                       losses=recorder.losses)
