import datetime as dt
import json

from usf_bios.bench.configs import get_config
from usf_bios.bench.measure import Measurement
from usf_bios.bench.report import build_report, markdown_table, report_path, result_row, slug, write_report

KEYS = {"config", "workload", "tokens_per_second", "mfu", "peak_memory_gb", "baseline_tokens_per_second",
        "baseline_peak_memory_gb", "speedup_vs_baseline", "memory_ratio_vs_baseline", "unsloth_tokens_per_second",
        "unsloth_peak_memory_gb", "speedup_vs_unsloth"}
CFG = get_config("llama3.1-8b-lora-bf16-4096")
OURS = Measurement(12_473.0, 30.0, [9.0, 1.0, 1.0], [5000, 12000, 12946], [2.0, 1.9, 1.8])
BASE = Measurement(5_000.0, 60.0, [9.0, 2.0, 3.0], [5000, 12000, 12946], [2.0, 1.9, 1.8])


def test_row_with_baseline():
    row = result_row(CFG, 8_030_261_248, OURS, BASE)
    assert KEYS <= set(row)
    assert row["config"] == CFG.name
    assert row["mfu"] == 0.4051
    assert row["speedup_vs_baseline"] == 2.495 and row["memory_ratio_vs_baseline"] == 0.5
    assert row["baseline_tokens_per_second"] == 5000.0 and row["baseline_peak_memory_gb"] == 60.0
    json.dumps(row)


def test_row_without_baseline_has_none_for_its_fields():
    row = result_row(CFG, 8_030_261_248, OURS, None, baseline_error="CUDA out of memory")
    for key in ("baseline_tokens_per_second", "baseline_peak_memory_gb", "speedup_vs_baseline",
                "memory_ratio_vs_baseline"):
        assert row[key] is None
    assert row["baseline_error"] == "CUDA out of memory"


def test_report_file_name_and_contents(tmp_path):
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("NVIDIA H100 (SXM5)/x") == "nvidia-h100-sxm5x"
    assert report_path(tmp_path, "NVIDIA H100 80GB HBM3", dt.date(2026, 11, 23)) == \
        tmp_path / "nvidia-h100-80gb-hbm3-2026-11-23.json"
    report = build_report("NVIDIA H100 80GB HBM3", "2.11.0+cu130", [result_row(CFG, 8_030_261_248, OURS, BASE)],
                          extra={"note": "random weights"})
    assert {"gpu", "torch", "transformers", "date", "results", "note"} <= set(report)
    assert dt.date.fromisoformat(report["date"])
    path = write_report(tmp_path / "bench", report)
    assert path == report_path(tmp_path / "bench", report["gpu"], report["date"])
    assert json.loads(path.read_text()) == report


def test_markdown_table():
    rows = [result_row(CFG, 8_030_261_248, OURS, BASE),
            result_row(get_config("qwen2.5-7b-lora-bf16-4096"), 7_615_616_512, OURS, None)]
    lines = markdown_table(build_report("H100", "2.11", rows)).strip().splitlines()
    assert lines[0] == ("| config | workload | tokens/s | MFU | peak GB | baseline tokens/s | baseline GB | speed-up | "
                        "memory ratio | Unsloth tokens/s | Unsloth GB | vs Unsloth |")
    assert len(lines) == 4
    assert lines[2] == ("| llama3.1-8b-lora-bf16-4096 | packed | 12,473 | 40.5% | 30.0 | 5,000 | 60.0 | 2.50× | 0.50 "
                        "| — | — | — |")
    assert lines[3].startswith("| qwen2.5-7b-lora-bf16-4096 | packed | 12,473 |") and lines[3].count("—") == 7


UNSLOTH_OFF = Measurement(10_000.0, 16.7, [9.0, 1.2, 1.3], [5000, 12000, 13000], [2.0, 1.9, 1.8])
UNSLOTH_ON = Measurement(14_762.0, 30.6, [9.0, 0.8, 0.9], [5000, 12000, 13000], [2.0, 1.9, 1.8])


def test_row_with_unsloth_takes_its_fastest_plan_and_lists_every_plan():
    row = result_row(CFG, 8_030_261_248, OURS, BASE, workload="full-rows",
                     unsloth={"unsloth": UNSLOTH_OFF, "unsloth-nockpt": UNSLOTH_ON})
    assert KEYS <= set(row) and row["workload"] == "full-rows"
    assert row["unsloth_plan"] == "unsloth-nockpt" and row["unsloth_error"] is None
    assert row["unsloth_tokens_per_second"] == 14762.0 and row["unsloth_peak_memory_gb"] == 30.6
    assert row["speedup_vs_unsloth"] == round(12_473 / 14_762, 3)
    plans = {p["plan"]: p for p in row["unsloth_plans"]}
    assert plans["unsloth"]["speedup_vs_unsloth"] == round(12_473 / 10_000, 3)
    assert plans["unsloth"]["memory_ratio_vs_unsloth"] == round(30.0 / 16.7, 3)
    assert plans["unsloth"]["checkpointing"] == "unsloth (offloaded)" and plans["unsloth-nockpt"]["checkpointing"] == "none"
    json.dumps(row)


def test_row_where_unsloth_did_not_run_has_none_and_says_why():
    row = result_row(CFG, 8_030_261_248, OURS, None,
                     unsloth_errors={"unsloth": "not run: unsloth is not installed here",
                                     "unsloth-nockpt": "not run: unsloth is not installed here"})
    for key in ("unsloth_tokens_per_second", "unsloth_peak_memory_gb", "speedup_vs_unsloth", "unsloth_plan"):
        assert row[key] is None
    assert "unsloth is not installed here" in row["unsloth_error"]
    assert [p["tokens_per_second"] for p in row["unsloth_plans"]] == [None, None]
    assert result_row(CFG, 8_030_261_248, OURS, BASE)["unsloth_error"] == "not asked for (--baseline unsloth)"


def test_one_plan_failing_leaves_the_other():
    row = result_row(CFG, 8_030_261_248, OURS, None, unsloth={"unsloth": UNSLOTH_OFF},
                     unsloth_errors={"unsloth-nockpt": "out of GPU memory"})
    assert row["unsloth_plan"] == "unsloth" and row["unsloth_tokens_per_second"] == 10000.0
    assert {p["plan"]: p["error"] for p in row["unsloth_plans"]} == {"unsloth": None, "unsloth-nockpt": "out of GPU memory"}
