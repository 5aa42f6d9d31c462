"""CPU jobs side by side each compute with their share of the cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import chat_rows, write_jsonl
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.threads import cpu_threads_for_job
from usf_bios.settings import Settings
from usf_bios.spec import parse_spec


@pytest.mark.parametrize("cores, jobs, environ, per_job, expected", [
    (2, 2, {}, None, 1),
    (16, 2, {}, None, 8),
    (16, 3, {}, None, 5),
    (2, 4, {}, None, 1),                      # never fewer than one
    (8, 1, {}, None, None),                   # alone: PyTorch's default
    (8, 0, {}, None, None),
    (8, 2, {"OMP_NUM_THREADS": "3"}, None, None),   # the user's choice stands
    (8, 2, {"OMP_NUM_THREADS": " "}, None, 4),      # an empty one is no choice
    (8, 2, {"OMP_NUM_THREADS": "3"}, 6, 6),   # USF_CPU_THREADS_PER_JOB wins
    (2, 1, {}, 4, 4),
])
def test_cpu_threads_for_job(cores, jobs, environ, per_job, expected):
    assert cpu_threads_for_job(cores, jobs, environ, per_job) == expected


def test_the_setting_is_read_and_bounded(monkeypatch):
    monkeypatch.setenv("USF_CPU_THREADS_PER_JOB", "3")
    assert Settings().cpu_threads_per_job == 3
    monkeypatch.setenv("USF_CPU_THREADS_PER_JOB", "0")
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.delenv("USF_CPU_THREADS_PER_JOB")
    assert Settings().cpu_threads_per_job is None


def _engine_on_two_cores(job_id: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cores = sorted(os.sched_getaffinity(0))[:2]
    return subprocess.run([sys.executable, "-m", "usf_bios.engine.run", job_id], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, cores))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_job_process_on_a_two_core_host_with_two_cpu_jobs_computes_with_one_thread(layout, tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    spec = {"name": "threads", "base_model": tiny_model, "dataset": str(dataset), "gpu_config": {"num_gpus": 0},
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "lora_r": 4,
                                "max_seq_length": 64, "val_split": 0.0, "precision": "fp32"}}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "USF_CPU_THREADS_PER_JOB")}
    shared = create_job(parse_spec(spec), layout)
    done = _engine_on_two_cores(shared, {**env, "USF_MAX_CPU_JOBS": "2"})
    assert done.returncode == 0, done.stderr
    log = layout.job_log(shared).read_text()
    assert re.search(r"CPU threads: 1 \(2 cores shared by up to USF_MAX_CPU_JOBS=2 CPU jobs\)", log), log

    chosen = create_job(parse_spec({**spec, "name": "threads-chosen"}), layout)
    done = _engine_on_two_cores(chosen, {**env, "USF_MAX_CPU_JOBS": "2", "USF_CPU_THREADS_PER_JOB": "2"})
    assert done.returncode == 0, done.stderr
    assert "CPU threads: 2 (USF_CPU_THREADS_PER_JOB)" in layout.job_log(chosen).read_text()
