"""Where a training step's time goes: ``python -m usf_bios.bench.profile CONFIG [--performance JSON] [--out F]``.

Runs our side of a bench configuration under ``torch.profiler`` (warm-up steps skipped, the next steps recorded)
and sums the GPU kernel time (CPU op time on a machine without CUDA) into categories: matrix products, attention,
fused/elementwise kernels, the loss, the optimizer, copies, other. Prints a table and the top kernels, and writes
them as JSON. The share of the wall time the GPU was busy shows how much the host holds it back.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
    ("attention", r"flash|fmha|attention|attn"),
    ("optimizer", r"adam|multi_tensor|fused_optim"),
    ("loss", r"logsumexp|cross_entropy|nll_loss|log_softmax|scatter|gather|fused_linear_cross"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm\d+_|aten::(mm|bmm|addmm|matmul|linear)\b|wgmma|hgmma"),
    ("norm/rope/swiglu", r"rms_norm|rmsnorm|rope|rotary|swiglu|silu|liger"),
    ("copy", r"copy|memcpy|memset|cat|transpose|contiguous|index"),
    ("elementwise", r"elementwise|vectorized|reduce|mul|add|pow|rsqrt|mean|triton"),
))


def category(kernel_name: str) -> str:
    """The category a kernel (or, on the CPU, an aten op) belongs to; the first matching rule wins."""
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return "other"


def summarize_kernels(kernels: list[tuple[str, float]], wall_seconds: float, top: int = 15) -> dict[str, Any]:
    """kernels: (name, seconds) pairs → totals per category, their shares, the busiest kernels, GPU-busy share."""
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for name, seconds in kernels:
        per_category[category(name)] += seconds
        per_kernel[name] += seconds
    busy = sum(per_category.values())
    return {
        "wall_seconds": round(wall_seconds, 4),
        "busy_seconds": round(busy, 4),
        "busy_share_of_wall": round(busy / wall_seconds, 4) if wall_seconds > 0 else None,
        "categories": {name: {"seconds": round(sec, 4), "share": round(sec / busy, 4) if busy else 0.0}
                       for name, sec in sorted(per_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:160], "seconds": round(sec, 4), "category": category(name)}
                        for name, sec in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]],
    }


def _kernels(prof: Any, cuda: bool) -> list[tuple[str, float]]:
    """Device kernels (CUDA) or top-level-ish aten ops (CPU) with their own time in seconds."""
    out = []
    for event in prof.events():
        if cuda:
            # the profiler's own step ranges show up as device events too; they are not kernels
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith("ProfilerStep"):
                out.append((event.name, event.device_time / 1e6))
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):  # outermost aten ops only
                out.append((event.name, event.cpu_time_total / 1e6))
    return out


def profile_config(config: str, performance: Any, *, record_steps: int = 2) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, schedule

    from usf_bios.bench.configs import get_config
    from usf_bios.bench.models import build_model
    from usf_bios.bench.ours import run_ours
    from usf_bios.bench.synthetic import synthetic_examples

    cfg = get_config(config)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    model = build_model(cfg.model, cfg.quantization, device, {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision])
    examples = synthetic_examples(cfg.num_examples, cfg.seq_len, model.config.vocab_size, cfg.seed)
    skip = max(cfg.warmup_steps, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    window: dict[str, float] = {}

    with profile(activities=activities, schedule=schedule(wait=skip - 1, warmup=1, active=record_steps, repeat=1)) as prof:
        def after_step(step: int) -> None:
            if step == skip:
                window["start"] = time.perf_counter()
            if step == skip + record_steps:
                window["end"] = time.perf_counter()
            prof.step()

        with tempfile.TemporaryDirectory(prefix="usf-profile-") as workdir:
            measurement, notes = run_ours(model, examples, cfg, performance, Path(workdir), after_step=after_step)
    if "end" not in window:
        raise ValueError(f"{config}: {len(measurement.step_seconds)} steps ran; the profile needs "
                         f"{skip + record_steps}")
    summary = summarize_kernels(_kernels(prof, cuda), window["end"] - window["start"], top=30)
    summary.update(config=config, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                   recorded_steps=record_steps, notes=notes, tokens_per_second=round(measurement.tokens_per_second, 1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['config']} on {summary['device']}: {summary['recorded_steps']} steps, "
             f"wall {summary['wall_seconds']:.3f} s, busy {summary['busy_seconds']:.3f} s "
             f"({(summary['busy_share_of_wall'] or 0):.0%} of wall)", "", f"{'category':<18} {'seconds':>9} {'share':>7}"]
    for name, entry in summary["categories"].items():
        lines.append(f"{name:<18} {entry['seconds']:>9.3f} {entry['share']:>7.1%}")
    lines += ["", "top kernels:"]
    lines += [f"  {k['seconds']:>8.3f} s  {k['category']:<17} {k['name'][:110]}" for k in summary["top_kernels"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from usf_bios.spec import Performance

    parser = argparse.ArgumentParser(prog="python -m usf_bios.bench.profile")
    parser.add_argument("config")
    parser.add_argument("--performance", default="{}")
    parser.add_argument("--steps", type=int, default=2, help="Steps recorded after the warm-up")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    summary = profile_config(args.config, Performance.model_validate(json.loads(args.performance)),
                             record_steps=args.steps)
    print(format_summary(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
