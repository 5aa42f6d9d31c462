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

from usf_bios.bench.configs import get_config, parameter_count
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


def run_bench(configs: list[str], *, out_dir: Path, performance: Performance, timeout: float = 1800,
              sides: tuple[str, ...] = ("baseline", "ours"), context: ContextSearch | None = None,
              log: Callable[[str], None] = print) -> Path:
    for name in configs + ([context.config] if context else []):
        get_config(name)  # unknown names fail before any GPU time is spent
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"performance": performance.model_dump(), "runs": []}
    gpu, torch_version, path = "unknown-gpu", "unknown", None

    def save() -> Path:
        report = build_report(gpu, torch_version, rows, extra=details)
        return write_report(out_dir, report)

    for name in configs:
        cfg = get_config(name)
        measured: dict[str, Measurement | None] = {"baseline": None, "ours": None}
        errors: dict[str, str] = {}
        for side in sides:
            log(f"== {name}: {side}")
            result = run_worker(name, side, performance, timeout)
            details["runs"].append({k: v for k, v in result.items() if k != "measurement"})
            gpu, torch_version = result.get("gpu", gpu), result.get("torch", torch_version)
            for note in result.get("notes", []):
                log(f"   {note}")
            if result.get("error"):
                errors[side] = result["error"]
                log(f"   error: {result['error']}")
            else:
                measured[side] = Measurement.from_dict(result["measurement"])
                m = measured[side]
                log(f"   {m.tokens_per_second:,.0f} tokens/s, peak {m.peak_memory_gb:.2f} GB")
        if measured["ours"] is not None:
            row = result_row(cfg, parameter_count(cfg.model), measured["ours"], measured["baseline"])
            if "baseline" in errors:
                row["baseline_error"] = errors["baseline"]
            rows.append(row)
        else:
            details.setdefault("failed", []).append({"config": name, "errors": errors})
        path = save()
    if context is not None:
        log(f"== {context.config}: longest context at batch 1" + (f" ({context.layers}-layer probe)" if context.layers else ""))
        extra = ["--context-start", str(context.start), "--context-limit", str(context.limit),
                 "--context-resolution", str(context.resolution)]
        if context.layers:
            extra += ["--layers", str(context.layers)]
        if context.gpu_memory_gb:
            extra += ["--gpu-memory-gb", str(context.gpu_memory_gb)]
        result = run_worker(context.config, "context", performance, timeout, extra_args=extra)
        gpu, torch_version = result.get("gpu", gpu), result.get("torch", torch_version)
        details["context_search"] = {"config": context.config, **result.get("context", {}), "error": result.get("error"),
                                     "notes": result.get("notes", [])}
        path = save()
    assert path is not None or not configs
    return path if path is not None else save()
