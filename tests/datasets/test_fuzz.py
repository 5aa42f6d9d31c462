"""A bounded fuzz run of the dataset parsers (scripts/fuzz_datasets.py, atheris): nothing but DatasetError."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is in the test extra (Linux, CPython wheels)")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_datasets.py"


def test_fifteen_seconds_of_fuzzing_finds_no_exception_but_dataset_error(tmp_path):
    corpus = tmp_path / "corpus"
    # Through sh, which forks the fuzzer: libFuzzer's -rss_limit_mb reads the peak RSS (ru_maxrss), and Linux
    # carries the peak across execve, so a fuzzer exec'd straight from this (torch-loaded, 1.6 GB) pytest worker
    # starts "over the limit". sh's own fork starts the count at sh's few MB.
    command = [sys.executable, str(SCRIPT), "-max_total_time=15", "-rss_limit_mb=1024",
               f"-artifact_prefix={tmp_path}/", str(corpus)]
    done = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *command],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not list(tmp_path.glob("crash-*")) and "Uncaught Python exception" not in output
    runs = int(re.search(r"Done (\d+) runs in", output).group(1))
    assert runs >= 1000, output[-2000:]            # it really ran
    assert len(list(corpus.iterdir())) > 10        # seeded, and grew
    peak = max(int(mb) for mb in re.findall(r"rss: (\d+)Mb", output))
    assert peak < 512, output[-2000:]              # the fuzzer's own memory, not its parent's
