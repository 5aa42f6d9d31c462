"""Profile a few optimizer steps of the real training loop (engine.loop.train) on the GPU.

Usage: python3 scripts/gpu/profile_step.py SPEC.yaml OUT_DIR
Builds the job's pieces the way engine.run does, then runs train() under torch.profiler:
2 steps skipped, 1 warm-up, 2 recorded. Prints the top kernels/ops and the GPU-busy share of the
recorded steps' wall time, and writes a gzipped Chrome trace. Then times one micro-batch's
forward+backward with packed position_ids (block-diagonal mask) against plain 0..L-1 positions
(no mask, causal fast path), to see what packing's attention mask costs.
"""
import gzip
import inspect
import os
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from usf_bios.datasets.formats import load_dataset
from usf_bios.datasets.locate import locate_dataset
from usf_bios.engine import checkpoint as ckpt
from usf_bios.engine.events import EventLog
from usf_bios.engine.loop import TrainingRun, autocast, token_losses, train
from usf_bios.engine.model import apply_lora, choose_placement, load_base_model, load_tokenizer
from usf_bios.engine.run import _scheduler, _tokenize
from usf_bios.models.sources import resolve_model
from usf_bios.settings import get_settings
from usf_bios.spec import load_spec
from usf_bios.storage import StorageLayout

WAIT, WARMUP, ACTIVE = 2, 1, 2


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(spec_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(spec_path)
    hp = spec.hyperparameters
    settings = get_settings()
    layout = StorageLayout.from_settings(settings)
    torch.manual_seed(hp.seed)
    placement = choose_placement(spec)
    resolved = resolve_model(spec.base_model, layout, settings.supported_model_sources)
    tokenizer = load_tokenizer(resolved, spec.trust_remote_code)
    extra = []
    if "config" in inspect.signature(load_base_model).parameters:  # newer engine passes check_model_folder's result
        from usf_bios.models.validate import check_model_folder
        extra = [check_model_folder(resolved.path)]
    model = apply_lora(load_base_model(resolved, spec, placement, *extra), spec)
    tmp = Path("/tmp/profile-events") / spec.name
    shutil.rmtree(tmp, ignore_errors=True)
    events = EventLog(tmp / "e.jsonl", tmp / "e.log")
    dataset = load_dataset(locate_dataset(spec.dataset, layout), spec.dataset_format)
    data = _tokenize(dataset, tokenizer, spec, events)
    total = WAIT + WARMUP + ACTIVE
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = _scheduler(optimizer, spec, total)
    state = ckpt.TrainerState(total_steps=total)
    marks: list[float] = []

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1)) as prof:
        def hook() -> bool:  # called by the loop at the start of every step
            sync()
            marks.append(time.perf_counter())
            if len(marks) > 1:
                print(f"step {len(marks) - 1}: {marks[-1] - marks[-2]:.3f} s", flush=True)
            prof.step()
            return False

        run = TrainingRun(model, optimizer, scheduler, data, placement, hp, state, events, tmp / "ckpt",
                          should_stop=hook, show_progress=False)
        train(run)
        sync()
        marks.append(time.perf_counter())
    events.close()
    print("profiling done; summarizing", flush=True)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    active_wall = sum(steps[WAIT + WARMUP:])
    averages = prof.key_averages()
    attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in averages if getattr(e, attr, 0) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy = sum(getattr(e, attr) for e in kernels) / 1e6
    n_kernels = sum(e.count for e in kernels)
    sort = "self_device_time_total" if attr == "self_device_time_total" else "self_cuda_time_total"
    report = [f"== {spec.name}: step wall times (s, profiler on): {[round(s, 3) for s in steps]}",
              f"recorded {ACTIVE} steps: wall {active_wall:.3f} s, GPU kernel time {gpu_busy:.3f} s "
              f"({100 * gpu_busy / active_wall:.0f}% busy), {n_kernels} kernel launches "
              f"({n_kernels / ACTIVE:.0f} per step)",
              prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70),
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)]
    print("\n".join(report), flush=True)
    if os.environ.get("TRACE") == "1":  # large and slow to write; off by default
        trace = out / f"{spec.name}.trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()

    # packed (block-diagonal mask) vs plain positions (causal fast path), one full micro-batch
    order = data.epoch_order(0)
    batch = data.micro_batch(order, 0).to(placement.device)
    plain = torch.arange(batch.input_ids.shape[1], device=placement.device).expand_as(batch.input_ids)
    model.train()
    timing = {}
    for label, positions in (("packed position_ids", batch.position_ids), ("plain 0..L-1", plain)):
        variant = type(batch)(batch.input_ids, positions.contiguous(), batch.targets, batch.real_tokens)
        times = []
        for i in range(6):
            sync()
            t = time.perf_counter()
            with autocast(placement):
                loss = token_losses(model, variant).sum() / 1e4
            loss.backward()
            sync()
            times.append(time.perf_counter() - t)
            optimizer.zero_grad(set_to_none=True)
        timing[label] = statistics.median(times[2:])
    report.append(f"one micro-batch {tuple(batch.input_ids.shape)} fwd+bwd, median of 4: "
                  + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timing.items()))
    text = "\n".join(report)
    print(report[-1], flush=True)
    (out / f"{spec.name}.profile.txt").write_text(text)


if __name__ == "__main__":
    main(*sys.argv[1:3])
