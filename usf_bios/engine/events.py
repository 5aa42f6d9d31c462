"""What the engine tells the world: one JSON event a line, plus a readable log.

Both files are append-only. A line torn by a kill is skipped when read, and the next writer
starts on a fresh line, so a resumed job keeps one readable stream.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

STAGES = ("loading_model", "tokenizing", "training", "evaluating", "saving")
DONE_STATUSES = ("completed", "failed", "cancelled")


def _open_append(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    handle = path.open("a", encoding="utf-8", buffering=1)
    if needs_newline:
        handle.write("\n")
    return handle


class EventLog:
    """Writes ``{job_id}.events.jsonl`` (machine) and ``{job_id}.log`` (human)."""

    def __init__(self, events_path: Path, log_path: Path, echo: bool = False):
        self.events_path = events_path
        self._events = _open_append(events_path)
        self._log = _open_append(log_path)
        self._echo = echo

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"ts": round(time.time(), 3), "type": kind, **fields}
        self._events.write(json.dumps(event, allow_nan=False, default=str) + "\n")
        return event

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._log.write(line + "\n")
        if self._echo:
            print(line, flush=True)

    def stage(self, stage: str, **extra: Any) -> None:
        assert stage in STAGES, stage
        self.emit("stage", stage=stage, **extra)
        self.log(f"stage: {stage}")

    def done(self, status: str, error: str | None = None) -> None:
        assert status in DONE_STATUSES, status
        self.emit("done", status=status, error=error)
        self.log(f"done: {status}" + (f" — {error}" if error else ""))

    def close(self) -> None:
        self._events.close()
        self._log.close()


def parse_event(line: str | bytes) -> dict[str, Any] | None:
    """One line of an events file, or None for a torn or garbled one."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and "type" in event else None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in the file; a torn or garbled line is skipped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [event for event in map(parse_event, lines) if event is not None]


def training_log(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per step (metric and eval merged). A step redone after a resume replaces the lost one."""
    points: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "metric":
            points[event["step"]] = {k: v for k, v in event.items() if k not in ("type", "ts")}
        elif event["type"] == "eval" and event["step"] in points:
            points[event["step"]]["validation_loss"] = event["validation_loss"]
    return [points[step] for step in sorted(points)]
