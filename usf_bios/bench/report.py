"""Benchmark results: one row per configuration, the JSON report beside them, and a Markdown table for the README."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from usf_bios.bench.configs import BenchConfig
from usf_bios.bench.measure import PEAK_BF16_FLOPS, Measurement, mfu

ROW_KEYS = ("config", "workload", "tokens_per_second", "mfu", "peak_memory_gb", "baseline",
            "baseline_tokens_per_second", "baseline_peak_memory_gb", "speedup_vs_baseline", "memory_ratio_vs_baseline",
            "unsloth_tokens_per_second", "unsloth_peak_memory_gb", "speedup_vs_unsloth")
UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth (offloaded)", "unsloth-nockpt": "none"}


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def unsloth_fields(ours: Measurement, n_params: int, plans: dict[str, Measurement | None],
                   errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The Unsloth fields of a row: every plan that was tried (``unsloth_plans``, with its own speed-up and memory
    ratio, or its error), and at the top level the fastest plan that ran; None there when none ran (and
    ``unsloth_error`` says why)."""
    errors = errors or {}
    listed = []
    for side in [*plans, *(e for e in errors if e not in plans)]:
        m = plans.get(side)
        entry: dict[str, Any] = {"plan": side, "checkpointing": UNSLOTH_CHECKPOINTING.get(side, side),
                                 "tokens_per_second": None, "peak_memory_gb": None, "mfu": None,
                                 "speedup_vs_unsloth": None, "memory_ratio_vs_unsloth": None,
                                 "error": errors.get(side)}
        if m is not None:
            entry.update(tokens_per_second=round(m.tokens_per_second, 1), peak_memory_gb=round(m.peak_memory_gb, 2),
                         mfu=round(mfu(m.tokens_per_second, n_params), 4),
                         speedup_vs_unsloth=_ratio(ours.tokens_per_second, m.tokens_per_second),
                         memory_ratio_vs_unsloth=_ratio(ours.peak_memory_gb, m.peak_memory_gb),
                         step_seconds=[round(x, 4) for x in m.step_seconds], step_tokens=list(m.step_tokens),
                         losses=[round(x, 4) for x in m.losses])
        listed.append(entry)
    ran = [e for e in listed if e["tokens_per_second"] is not None]
    best = max(ran, key=lambda e: e["tokens_per_second"]) if ran else None
    return {
        "unsloth_tokens_per_second": best["tokens_per_second"] if best else None,
        "unsloth_peak_memory_gb": best["peak_memory_gb"] if best else None,
        "speedup_vs_unsloth": best["speedup_vs_unsloth"] if best else None,
        "unsloth_plan": best["plan"] if best else None,
        "unsloth_error": None if best else ("; ".join(f"{e['plan']}: {e['error']}" for e in listed if e["error"])
                                            or None),
        "unsloth_plans": listed,
    }


def result_row(config: BenchConfig, n_params: int, ours: Measurement, baseline: Measurement | None,
               baseline_error: str | None = None, *, workload: str = "packed", baseline_name: str | None = "hf",
               unsloth: dict[str, Measurement | None] | None = None,
               unsloth_errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The report row of one configuration and workload; the baseline fields are None when it did not run or
    failed (OOM), the Unsloth fields likewise (``unsloth_fields``)."""
    row: dict[str, Any] = {
        "config": config.name,
        "workload": workload,
        "tokens_per_second": round(ours.tokens_per_second, 1),
        "mfu": round(mfu(ours.tokens_per_second, n_params), 4),
        "peak_memory_gb": round(ours.peak_memory_gb, 2),
        "baseline": baseline_name,
        "baseline_tokens_per_second": None,
        "baseline_peak_memory_gb": None,
        "speedup_vs_baseline": None,
        "memory_ratio_vs_baseline": None,
    }
    if baseline is not None:
        row.update(baseline_tokens_per_second=round(baseline.tokens_per_second, 1),
                   baseline_peak_memory_gb=round(baseline.peak_memory_gb, 2),
                   speedup_vs_baseline=_ratio(ours.tokens_per_second, baseline.tokens_per_second),
                   memory_ratio_vs_baseline=_ratio(ours.peak_memory_gb, baseline.peak_memory_gb))
    row.update(unsloth_fields(ours, n_params, unsloth or {}, unsloth_errors))
    if not unsloth and not unsloth_errors:
        row["unsloth_error"] = "not asked for (--baseline unsloth)"
    row.update(
        model=config.model, quantization=config.quantization, seq_len=config.seq_len, n_params=n_params,
        baseline_mfu=round(mfu(baseline.tokens_per_second, n_params), 4) if baseline is not None else None,
        baseline_error=baseline_error,
        ours_step_seconds=[round(s, 4) for s in ours.step_seconds],
        ours_step_tokens=list(ours.step_tokens),
        ours_losses=[round(x, 4) for x in ours.losses],
        baseline_step_seconds=[round(s, 4) for s in baseline.step_seconds] if baseline is not None else None,
        baseline_step_tokens=list(baseline.step_tokens) if baseline is not None else None,
        baseline_losses=[round(x, 4) for x in baseline.losses] if baseline is not None else None,
    )
    return row


def build_report(gpu_name: str, torch_version: str, results: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report: where it ran, with which library versions, and the rows."""
    import peft
    import transformers

    report: dict[str, Any] = {
        "gpu": gpu_name,
        "torch": torch_version,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "peak_bf16_flops": PEAK_BF16_FLOPS,
        "results": list(results),
    }
    report.update(extra or {})
    return report


def slug(text: str) -> str:
    """Lower case, spaces to '-', only [a-z0-9.-] kept: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    kept = re.sub(r"[^a-z0-9.-]", "", text.lower().replace(" ", "-"))
    return re.sub(r"-{2,}", "-", kept).strip("-") or "unknown"


def report_path(folder: Path, gpu_name: str, date: str | dt.date) -> Path:
    day = date if isinstance(date, str) else date.isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
        raise ValueError(f"date must be YYYY-MM-DD, got {day!r}")
    return Path(folder) / f"{slug(gpu_name)}-{day}.json"


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    """Write the report as <gpu>-<date>.json in ``folder`` and return its path."""
    path = report_path(folder, report["gpu"], report["date"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table; '—' where the baseline did not run."""
    lines = ["| config | workload | tokens/s | MFU | peak GB | baseline tokens/s | baseline GB | speed-up | memory ratio "
             "| Unsloth tokens/s | Unsloth GB | vs Unsloth |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        lines.append("| " + " | ".join([
            row["config"],
            row.get("workload", "packed"),
            _cell(row["tokens_per_second"], ",.0f"),
            _cell(row["mfu"], ".1%"),
            _cell(row["peak_memory_gb"], ".1f"),
            _cell(row["baseline_tokens_per_second"], ",.0f"),
            _cell(row["baseline_peak_memory_gb"], ".1f"),
            "—" if row["speedup_vs_baseline"] is None else f"{row['speedup_vs_baseline']:.2f}×",
            "—" if row["memory_ratio_vs_baseline"] is None else f"{row['memory_ratio_vs_baseline']:.2f}",
            _cell(row.get("unsloth_tokens_per_second"), ",.0f"),
            _cell(row.get("unsloth_peak_memory_gb"), ".1f"),
            "—" if row.get("speedup_vs_unsloth") is None else f"{row['speedup_vs_unsloth']:.2f}×",
        ]) + " |")
    return "\n".join(lines) + "\n"
