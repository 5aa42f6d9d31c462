import datetime as dt
import json

from usf_bios.bench.configs import get_config
from usf_bios.bench.measure import Measurement
from usf_bios.bench.report import build_report, markdown_table, report_path, result_row, slug, write_report

KEYS = {"config", "tokens_per_second", "mfu", "peak_memory_gb", "baseline_tokens_per_second",
        "baseline_peak_memory_gb", "speedup_vs_baseline", "memory_ratio_vs_baseline"}
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
    assert lines[0] == ("| config | tokens/s | MFU | peak GB | baseline tokens/s | baseline GB | speed-up | "
                        "memory ratio |")
    assert len(lines) == 4
    assert lines[2] == "| llama3.1-8b-lora-bf16-4096 | 12,473 | 40.5% | 30.0 | 5,000 | 60.0 | 2.50× | 0.50 |"
    assert lines[3].startswith("| qwen2.5-7b-lora-bf16-4096 | 12,473 |") and lines[3].count("—") == 4
