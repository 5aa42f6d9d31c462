"""Shared fixtures: a temporary storage root and tiny models built in the test run."""

from __future__ import annotations

import json
import os
import shutil
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
