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

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def browser() -> Iterator:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)   # the first estimate or stats import transformers in the server (2 cores)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install chromium; .ci/run does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@dataclass
class Console:
    """What the page logged as an error; a test may allow messages it provokes on purpose."""

    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def open_page(browser, console: Console, tmp_path: Path):
    """open_page(base_url, viewport=DESKTOP, **context options such as timezone_id) → a fresh page (own
    context: storage, downloads) at that size."""
    contexts = []

    def open_(base_url: str, viewport: dict = DESKTOP, **options):
        context = browser.new_context(base_url=base_url, viewport=viewport, accept_downloads=True, **options)
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        page.on("console", lambda m: console.errors.append(f"console.{m.type}: {m.text} ({m.location.get('url')})")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not console.unexpected(), "errors in the browser console:\n" + "\n".join(console.unexpected())


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
