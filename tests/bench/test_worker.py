"""One side of a bench configuration in-process, on the CPU (the GPU runs are in docs/benchmarks)."""

from __future__ import annotations

from usf_bios.bench.worker import run_side
from usf_bios.spec import Performance


def test_our_side_measures_the_tiny_configuration():
    result = run_side("tiny-llama-lora-fp32-256", "ours", Performance())
    assert result["error"] is None, result.get("traceback")
    measurement = result["measurement"]
    assert measurement["tokens_per_second"] > 0 and len(measurement["step_seconds"]) == len(measurement["losses"])
    assert any(note.startswith("speed: ") for note in result["notes"])


def test_a_smaller_card_is_only_emulated_on_a_gpu():
    result = run_side("tiny-llama-lora-fp32-256", "ours", Performance(), gpu_memory_gb=80)
    assert result["error"] == "ValueError: --gpu-memory-gb needs a GPU"


def test_unsloth_sides_say_why_they_did_not_run_where_it_is_absent():
    for side in ("unsloth", "unsloth-nockpt"):
        result = run_side("tiny-llama-lora-fp32-256", side, Performance())
        assert result["missing"] is True and "measurement" not in result
        assert result["error"] == "not run: unsloth is not installed here"


def test_full_rows_workload_trains_rows_of_the_full_length():
    result = run_side("tiny-llama-lora-fp32-256", "ours", Performance(), workload="full-rows")
    assert result["error"] is None, result.get("traceback")
    assert result["workload"] == "full-rows"
    # 4 examples of 256 tokens a step, each its own row
    assert set(result["measurement"]["step_tokens"]) == {4 * 256}


def test_hf_best_side_runs_on_the_cpu():
    result = run_side("tiny-llama-lora-fp32-256", "hf-best", Performance())
    assert result["error"] is None, result.get("traceback")
    assert any(note.startswith("hf-best: micro-batch ") for note in result["notes"])
