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


def test_a_smaller_card_is_only_emulated_for_the_context_search_on_a_gpu():
    result = run_side("tiny-llama-lora-fp32-256", "ours", Performance(), gpu_memory_gb=80)
    assert result["error"] == "ValueError: --gpu-memory-gb applies to the context search on a GPU"
