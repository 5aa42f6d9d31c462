"""Shared fixtures: a temporary storage root, tiny models built in the test run, and the browser (Debian's
Chromium through Playwright, one for the session, a page that fails its test on a console error)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from tests.tiny import build_tiny_model
from usf_bios.settings import get_settings
from usf_bios.storage import StorageLayout


@pytest.fixture
def usf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """USF_HOME pointing at a fresh folder; every derived path follows it."""
    home = tmp_path / "usf"
    for var in ("OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "USF_MODEL_PATH", "HF_HOME", "TRANSFORMERS_CACHE",
                "MODELSCOPE_CACHE", "SUPPORTED_MODEL_SOURCES", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USF_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def layout(usf_home: Path) -> StorageLayout:
    layout = StorageLayout.from_settings(get_settings())
    layout.ensure()
    return layout


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny_model(layout: StorageLayout, tiny_model_template: Path) -> str:
    """A tiny random Llama registered under USF_MODEL_PATH as 'test--tiny-llama'."""
    shutil.copytree(tiny_model_template, layout.models / "test--tiny-llama")
    return "test--tiny-llama"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    """Conversations of varied length (some multi-turn, some with a system message)."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        for turn in range(1 + i % 2):
            messages.append({"role": "user", "content": f"What is {i} plus {turn}? " + "Tell me. " * (i % 4)})
            messages.append({"role": "assistant", "content": f"The answer is {i + turn}." + " Indeed." * (i % 5)})
        rows.append({"messages": messages})
    return rows


def event_dicts(path: Path) -> list[dict]:
    """Every event of an events file as the JSON it was written as (engine.events.read_events, dumped)."""
    from usf_bios.engine.events import read_events

    return [event.model_dump(mode="json") for event in read_events(path)[0]]


# -- the browser (tests/web, and the UI checks of tests/worker): one Chromium for the whole session ------------------
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
