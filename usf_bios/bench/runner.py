"""``usf-bios bench``: each configuration's baseline and our engine, one after the other on one GPU, each in its
own process; the report is rewritten after every configuration, so a run cut short keeps what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from usf_bios.bench.configs import WORKLOADS, get_config, parameter_count, workload_config
from usf_bios.bench.peers import UNSLOTH_PLANS
from usf_bios.bench.measure import Measurement
from usf_bios.bench.report import build_report, result_row, write_report
from usf_bios.spec import Performance


@dataclass(frozen=True)
class ContextSearch:
    config: str
    layers: int | None = None       # a probe with fewer decoder layers; None = the whole model
    start: int = 32_768
    limit: int = 524_288
    resolution: int = 8_192
    gpu_memory_gb: float | None = None  # search as on a card with this much memory (the rest held as ballast)


def run_worker(config: str, side: str, performance: Performance, timeout: float, *,
               extra_args: list[str] | None = None) -> dict[str, Any]:
    """Run one side in a fresh process; a crash or a timeout becomes an error entry."""
    with tempfile.TemporaryDirectory(prefix="usf-bench-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "usf_bios.bench.worker", config, side, str(out),
                   "--performance", performance.model_dump_json(), *(extra_args or [])]
        try:
            completed = subprocess.run(command, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"side": side, "config": config, "error": f"did not finish within {timeout:.0f} s", "notes": []}
        if not out.exists():
            return {"side": side, "config": config, "notes": [],
                    "error": f"the worker exited with status {completed.returncode} without a result"}
        return json.loads(out.read_text())


BASELINES = ("hf", "hf-best", "unsloth")


def baseline_sides(baselines: tuple[str, ...]) -> tuple[str, ...]:
    """The worker sides the baselines asked for run as: ``unsloth`` is two (with its checkpointing and without)."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; known: {', '.join(BASELINES)}")
    if "hf" in baselines and "hf-best" in baselines:
        raise ValueError("--baseline: hf and hf-best both fill the baseline fields; pick one")
    sides: list[str] = [b for b in baselines if b != "unsloth"]
    if "unsloth" in baselines:
        sides += list(UNSLOTH_PLANS)
    return tuple(sides)


def run_bench(configs: list[str], *, out_dir: Path, performance: Performance, timeout: float = 1800,
              sides: tuple[str, ...] = ("baseline", "ours"), context: ContextSearch | None = None,
              baselines: tuple[str, ...] = ("hf",), workloads: tuple[str, ...] = ("packed",),
              gpu_memory_gb: float | None = None, log: Callable[[str], None] = print) -> Path:
    """``sides``: "baseline" (the ``baselines``) and/or "ours"; each configuration runs each of ``workloads``;
    ``gpu_memory_gb``: every side runs as on a card of that size (the rest held aside)."""
    for name in configs + ([context.config] if context else []):
        get_config(name)  # unknown names fail before any GPU time is spent
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    peer_sides = baseline_sides(baselines) if "baseline" in sides else ()
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"performance": performance.model_dump(), "baselines": list(baselines),
                               "workloads": list(workloads), "gpu_memory_gb": gpu_memory_gb, "runs": []}
    gpu, torch_version, path = "unknown-gpu", "unknown", None

    def save() -> Path:
        report = build_report(gpu, torch_version, rows, extra=details)
        return write_report(out_dir, report)

    extra = ["--gpu-memory-gb", str(gpu_memory_gb)] if gpu_memory_gb else []
    for name in configs:
        for workload in workloads:
            cfg = workload_config(get_config(name), workload)
            measured: dict[str, Measurement | None] = {}
            errors: dict[str, str] = {}
            for side in [*peer_sides, *(["ours"] if "ours" in sides else [])]:
                log(f"== {name} ({workload}): {side}")
                result = run_worker(name, side, performance, timeout, extra_args=[*extra, "--workload", workload])
                details["runs"].append({k: v for k, v in result.items() if k != "measurement"})
                gpu, torch_version = result.get("gpu", gpu), result.get("torch", torch_version)
                for note in result.get("notes", []):
                    log(f"   {note}")
                if result.get("error"):
                    errors[side] = result["error"]
                    log(f"   error: {result['error']}")
                else:
                    measured[side] = m = Measurement.from_dict(result["measurement"])
                    log(f"   {m.tokens_per_second:,.0f} tokens/s, peak {m.peak_memory_gb:.2f} GB")
            baseline_name = next((b for b in ("hf", "hf-best") if b in peer_sides), None)
            if measured.get("ours") is not None:
                unsloth = {s: measured.get(s) for s in UNSLOTH_PLANS if s in peer_sides}
                row = result_row(cfg, parameter_count(cfg.model), measured["ours"],
                                 measured.get(baseline_name) if baseline_name else None,
                                 errors.get(baseline_name) if baseline_name else None, workload=workload,
                                 baseline_name=baseline_name, unsloth={k: v for k, v in unsloth.items() if v},
                                 unsloth_errors={s: errors[s] for s in UNSLOTH_PLANS if s in errors})
                rows.append(row)
            else:
                details.setdefault("failed", []).append({"config": name, "workload": workload, "errors": errors,
                                                         "measured": {s: m.to_dict() for s, m in measured.items()
                                                                      if m is not None}})
            path = save()
    if context is not None:
        log(f"== {context.config}: longest context at batch 1" + (f" ({context.layers}-layer probe)" if context.layers else ""))
        extra = ["--context-start", str(context.start), "--context-limit", str(context.limit),
                 "--context-resolution", str(context.resolution)]
        if context.layers:
            extra += ["--layers", str(context.layers)]
        if context.gpu_memory_gb or gpu_memory_gb:
            extra += ["--gpu-memory-gb", str(context.gpu_memory_gb or gpu_memory_gb)]
        result = run_worker(context.config, "context", performance, timeout, extra_args=extra)
        gpu, torch_version = result.get("gpu", gpu), result.get("torch", torch_version)
        details["context_search"] = {"config": context.config, **result.get("context", {}), "error": result.get("error"),
                                     "notes": result.get("notes", [])}
        path = save()
    assert path is not None or not configs
    return path if path is not None else save()
