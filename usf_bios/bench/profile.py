"""Where a training step's time goes: ``python -m usf_bios.bench.profile CONFIG [--performance JSON] [--out F]``.

Runs our side of a bench configuration under ``torch.profiler`` (warm-up steps skipped, the next steps recorded)
and sums the GPU kernel time (CPU op time on a machine without CUDA) into categories: matrix products, attention,
fused/elementwise kernels, the loss, the optimizer, copies, other. Prints a table and the top kernels, and writes
them as JSON. The share of the wall time the GPU was busy shows how much the host holds it back; the GPU's idle
gaps, by size, with the host code running in the largest ones, show where. ``--trace F.json.gz`` keeps the whole
timeline for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import gzip
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


GAP_BUCKETS_MS = (0.1, 1.0, 10.0)


def idle_gaps(kernels: list[tuple[str, float, float]], host: list[tuple[str, float, float]], *,
              top: int = 12) -> dict[str, Any]:
    """Where the GPU sat idle between its first and last kernel. ``kernels`` and ``host`` are (name, start µs, end µs)
    on one clock (overlapping kernels count once). Returns the idle time, the gaps by size and the largest gaps with
    the kernels either side and the host ranges (outermost first) open at the gap's middle."""
    spans = sorted((start, end, name) for name, start, end in kernels)
    gaps: list[tuple[float, float, str, str]] = []   # (start, end, kernel before, kernel after)
    covered_end, last_name = (spans[0][1], spans[0][2]) if spans else (0.0, "")
    for start, end, name in spans[1:]:
        if start > covered_end:
            gaps.append((covered_end, start, last_name, name))
        if end > covered_end:
            covered_end, last_name = end, name
    bounds = (0.0, *GAP_BUCKETS_MS, float("inf"))
    buckets = {}
    for low, high in zip(bounds[:-1], bounds[1:]):
        sizes = [(e - s) / 1e3 for s, e, _, _ in gaps if low <= (e - s) / 1e3 < high]
        label = f"{low:g}-{high:g} ms" if high != float("inf") else f">= {low:g} ms"
        buckets[label] = {"count": len(sizes), "seconds": round(sum(sizes) / 1e3, 4)}
    largest = []
    for start, end, before, after in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        middle = (start + end) / 2
        open_ranges = sorted((s, -e, name) for name, s, e in host if s <= middle <= e)
        largest.append({"ms": round((end - start) / 1e3, 3), "after_kernel": before[:100], "before_kernel": after[:100],
                        "host": [name[:80] for _, _, name in open_ranges[:8]]})
    return {"idle_seconds": round(sum(e - s for s, e, _, _ in gaps) / 1e6, 4), "gaps": buckets, "largest": largest}


def _is_kernel(event: Any) -> bool:
    """A device kernel; the profiler's own step ranges show up as device events too, and are not."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith("ProfilerStep")


def _spans(prof: Any) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """(device kernels, host ranges) as (name, start µs, end µs)."""
    kernels, host = [], []
    for event in prof.events():
        span = (event.name, float(event.time_range.start), float(event.time_range.end))
        if _is_kernel(event):
            kernels.append(span)
        elif event.device_type != torch.autograd.DeviceType.CUDA:
            host.append(span)
    return kernels, host


def _kernels(prof: Any, cuda: bool) -> list[tuple[str, float]]:
    """Device kernels (CUDA) or top-level-ish aten ops (CPU) with their own time in seconds."""
    out = []
    for event in prof.events():
        if cuda:
            if _is_kernel(event):
                out.append((event.name, event.device_time / 1e6))
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):  # outermost aten ops only
                out.append((event.name, event.cpu_time_total / 1e6))
    return out


def profile_config(config: str, performance: Any, *, record_steps: int = 2, trace: Path | None = None) -> dict[str, Any]:
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
    if cuda:
        kernels, host = _spans(prof)
        if kernels:
            summary["idle"] = idle_gaps(kernels, host)
    if trace is not None:
        with tempfile.TemporaryDirectory(prefix="usf-trace-") as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
                dst.write(src.read())
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
    if idle := summary.get("idle"):
        lines += ["", f"GPU idle between kernels: {idle['idle_seconds']:.3f} s"]
        lines += [f"  {label:<14} {b['count']:>7} gaps {b['seconds']:>8.3f} s" for label, b in idle["gaps"].items()]
        lines += ["largest gaps:"] + [f"  {g['ms']:>8.3f} ms  {' > '.join(g['host'])}  (before {g['before_kernel'][:50]})"
                                      for g in idle["largest"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from usf_bios.engine.memory import prefer_expandable_segments
    from usf_bios.spec import Performance

    prefer_expandable_segments()
    parser = argparse.ArgumentParser(prog="python -m usf_bios.bench.profile")
    parser.add_argument("config")
    parser.add_argument("--performance", default="{}")
    parser.add_argument("--steps", type=int, default=2, help="Steps recorded after the warm-up")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="Write the timeline here (gzipped Chrome trace)")
    args = parser.parse_args(argv)
    summary = profile_config(args.config, Performance.model_validate(json.loads(args.performance)),
                             record_steps=args.steps, trace=args.trace)
    print(format_summary(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
