"""The peers our engine is measured against beside the Trainer baseline (``hf``), each in its own process:

- ``unsloth``: Unsloth (``FastLanguageModel``) with its own checkpointing (``use_gradient_checkpointing="unsloth"``:
  layer inputs offloaded to host memory), and ``unsloth-nockpt`` without checkpointing. Unsloth loads a model
  folder, so the random model of the bench's shape is saved to local disk first (``save_model_folder``), with a
  small tokenizer. Unsloth takes packed rows (batch 1, positions restarting at each example, no attention mask:
  it finds the example boundaries from the positions and keeps the examples apart in attention), so it trains
  exactly our rows, in our order, micro-batch for micro-batch (timed on a second pass over them, after its
  compilations: see ``run_unsloth``).
- ``hf-best``: transformers + peft + Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), no
  checkpointing, the largest micro-batch that fits (tried from the step's examples downwards, halving on running
  out of memory during the first, untimed step); the step's examples padded to the micro-batch's longest, as the
  Trainer baseline pads them.

Both loops time each optimizer step between CUDA events and count the real (non-padding) tokens, as ours does.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

import torch

from usf_bios.bench.configs import BenchConfig
from usf_bios.bench.measure import Measurement, summarize
from usf_bios.engine.data import IGNORE, Batch, TokenizedExample

UNSLOTH_PLANS: dict[str, Any] = {"unsloth": "unsloth", "unsloth-nockpt": False}   # side -> use_gradient_checkpointing
PEERS = (*UNSLOTH_PLANS, "hf-best")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_missing() -> str | None:
    """Why Unsloth cannot run here, or None when it can."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed here"
    if not torch.cuda.is_available():
        return "Unsloth needs a CUDA GPU"
    return None


def hf_labels(targets: torch.Tensor) -> torch.Tensor:
    """Our targets (``targets[t]`` = the token after ``t``, IGNORE at each example's end) as the labels a
    transformers model shifts itself: ``labels[t + 1] = targets[t]``, so the same tokens are trained."""
    labels = torch.full_like(targets, IGNORE)
    labels[:, 1:] = targets[:, :-1]
    return labels


def save_model_folder(model: Any, folder: Path) -> Path:
    """Save ``model`` (random weights) and a small word-level tokenizer whose ids fit its vocabulary to ``folder``,
    as a model folder that ``from_pretrained`` loads; kept when ``folder/config.json`` already exists."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(252)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=config.max_position_embeddings)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    (folder / "usf-bench.json").write_text(json.dumps({"random_weights": True}))
    return folder


def _time_steps(step_batches: list[list[Batch]], run_micro_batch: Callable[[Batch, int], torch.Tensor],
                optimizer: torch.optim.Optimizer, cuda: bool) -> tuple[list[float], list[int], list[float]]:
    """Run each step (its micro-batches, then the optimizer) timed between CUDA events (host clock on the CPU)."""
    import time

    seconds, tokens, losses = [], [], []
    for batches in step_batches:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        step_loss = sum(run_micro_batch(batch, len(batches)).detach().float() for batch in batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            seconds.append(time.perf_counter() - began)
        tokens.append(sum(b.real_tokens for b in batches))
        losses.append(step_loss)
    return seconds, tokens, [float(x) for x in losses]   # read once the steps are timed


def _optimizer(model: Any, cfg: BenchConfig, cuda: bool) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0, fused=cuda)


def run_unsloth(folder: Path, cfg: BenchConfig, step_batches: list[list[Batch]], side: str, *,
                warm_pass: bool = True) -> tuple[Measurement, list[str]]:
    """Train with Unsloth on our rows (each micro-batch one packed row, batch 1); ``side`` picks its checkpointing.
    With ``warm_pass`` every step runs once untimed before the timed pass over the same rows (its compilations
    would otherwise land in the timed steps: one per new count of examples in a row, 5-30 s each, seen on the
    H200); our side gets no such pass. Unsloth must have been imported before transformers in this process."""
    from unsloth import FastLanguageModel

    checkpointing = UNSLOTH_PLANS[side]
    device = torch.device("cuda", 0)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(folder), max_seq_length=cfg.seq_len, dtype=torch.bfloat16,
        load_in_4bit=cfg.quantization == "4bit", fix_tokenizer=False, use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS,
        use_gradient_checkpointing=checkpointing, random_state=cfg.seed, max_seq_length=cfg.seq_len)
    FastLanguageModel.for_training(model)
    optimizer = _optimizer(model, cfg, True)
    notes = [f"unsloth: use_gradient_checkpointing={checkpointing!r}, packed rows at batch 1 "
             f"({len(step_batches[0])} per step)"]

    def micro_batch(batch: Batch, accumulation: int) -> torch.Tensor:
        out = model(input_ids=batch.input_ids.to(device, non_blocking=True),
                    position_ids=batch.position_ids.to(device, non_blocking=True),
                    labels=hf_labels(batch.targets).to(device, non_blocking=True))
        loss = out.loss / accumulation
        loss.backward()
        return loss

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if warm_pass:  # Unsloth compiles each decoder block, again for each new count of examples in a row
        warm = _time_steps(step_batches, micro_batch, optimizer, True)
        notes.append("unsloth: a first, untimed pass over every step's rows (its compilations, one per new count of "
                     f"examples in a row, out of the timed pass): {', '.join(f'{x:.2f}' for x in warm[0])} s")
    seconds, tokens, losses = _time_steps(step_batches, micro_batch, optimizer, True)
    peak = torch.cuda.max_memory_allocated() / 1e9
    return Measurement(summarize(seconds, tokens, cfg.warmup_steps), peak, seconds, tokens, losses), notes


def padded_batch(examples: list[TokenizedExample], pad_id: int = 0) -> Batch:
    """Examples padded to the longest (one row each): input ids, positions, our targets, real tokens."""
    from usf_bios.engine.data import collate

    return collate([[ex] for ex in examples], pad_id)


def run_hf_best(model: Any, cfg: BenchConfig, examples: list[TokenizedExample], *, examples_per_step: int,
                micro_batches: tuple[int, ...] | None = None) -> tuple[Measurement, list[str]]:
    """transformers + peft (+ Liger on a GPU), no checkpointing, the largest micro-batch of the step's examples that
    fits; step k trains examples[k*E:(k+1)*E] (E = ``examples_per_step``) padded to each micro-batch's longest."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    notes = []
    if cuda and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
        notes.append("hf-best: Liger RMSNorm, RoPE, SwiGLU and fused linear cross-entropy")
    else:
        notes.append("hf-best: without Liger (not installed, or no GPU)")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM", bias="none"))
    optimizer = _optimizer(model, cfg, cuda)
    steps = [examples[k * examples_per_step:(k + 1) * examples_per_step] for k in range(cfg.steps)]
    candidates = micro_batches or tuple(b for b in (16, 8, 4, 2, 1) if b <= examples_per_step
                                        and examples_per_step % b == 0)

    def micro_batch(batch: Batch, accumulation: int) -> torch.Tensor:
        mask = attention_mask(batch)
        out = model(input_ids=batch.input_ids.to(device, non_blocking=True),
                    attention_mask=mask.to(device, non_blocking=True),
                    labels=hf_labels(batch.targets).to(device, non_blocking=True))
        loss = out.loss / accumulation
        loss.backward()
        return loss

    def batches_of(step: list[TokenizedExample], size: int) -> list[Batch]:
        return [padded_batch(step[i:i + size]) for i in range(0, len(step), size)]

    if cfg.warmup_steps < 1:
        raise ValueError(f"{cfg.name}: hf-best needs a warm-up step (its first step picks the micro-batch)")
    chosen, first = None, ([], [], [])
    for size in candidates:  # the first (untimed) step decides the micro-batch
        try:
            if cuda:
                torch.cuda.empty_cache()
            first = _time_steps([batches_of(steps[0], size)], micro_batch, optimizer, cuda)
            chosen = size
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            notes.append(f"hf-best: micro-batch {size} ran out of memory")
    if chosen is None:
        raise torch.OutOfMemoryError("hf-best: even a micro-batch of 1 ran out of memory")
    notes.append(f"hf-best: micro-batch {chosen}, {examples_per_step // chosen} per step, no checkpointing")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens, losses = _time_steps([batches_of(s, chosen) for s in steps[1:]], micro_batch, optimizer, cuda)
    seconds, tokens, losses = first[0] + seconds, first[1] + tokens, first[2] + losses  # the probe: a warm-up step
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
    return Measurement(summarize(seconds, tokens, cfg.warmup_steps), peak, seconds, tokens, losses), notes



def attention_mask(batch: Batch) -> torch.Tensor:
    """1 on each row's example, 0 on its padding (one example a row: its positions rise from 0 until the padding's
    restart at 0)."""
    pos = batch.position_ids
    rising = torch.cat([torch.ones_like(pos[:, :1], dtype=torch.bool), pos[:, 1:] > pos[:, :-1]], dim=1)
    return torch.cumprod(rising.long(), dim=1)
