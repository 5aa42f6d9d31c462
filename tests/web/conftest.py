"""Browser fixtures: Debian's Chromium driven by Playwright (never a downloaded browser), a real server,
and a page that fails its test on any console error or uncaught exception."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.api.conftest import database_url, make_server, server, server_env  # noqa: F401
from tests.api.test_restart import engine_pids

from tests.conftest import CHROMIUM, DESKTOP, PHONE, Console  # noqa: F401  (the browser fixtures live there)


@pytest.fixture
def page(server, open_page):
    """A desktop-sized page on a fresh loopback server (no key needed)."""
    return open_page(server.url)


def copy_model(template: Path, home: Path, name: str) -> Path:
    folder = home / "models" / name
    shutil.copytree(template, folder)
    return folder


def metric_steps(home: Path, job_id: str) -> list[int]:
    """The steps of the job's metric events so far, from its events file (which the database follows)."""
    path = home / "data" / "logs" / f"{job_id}.events.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:    # whole lines only
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("type") == "metric":
            steps.append(int(event["step"]))
    return steps


@contextmanager
def engine_paused(home: Path, job_id: str, after_step: int = 1, timeout: float = 300) -> Iterator[int]:
    """SIGSTOP the job's engine once its events file holds step ``after_step``; yields the last step written
    before the pause, and lets the engine go on (SIGCONT) at the end. A fast job cannot slip past a check."""
    deadline = time.monotonic() + timeout
    while not any(step >= after_step for step in metric_steps(home, job_id)):
        assert time.monotonic() < deadline, f"job {job_id} never reached step {after_step}"
        time.sleep(0.01)
    [engine] = engine_pids(job_id)
    os.kill(engine, signal.SIGSTOP)
    try:
        yield metric_steps(home, job_id)[-1]
    finally:
        os.kill(engine, signal.SIGCONT)
