"""What the engine tells the world: one typed JSON event a line, plus a readable log.

Each event type is a pydantic model (``StageEvent``, ``MetricEvent``, ``EvalEvent``, ``CheckpointEvent``,
``DoneEvent``); the engine writes them with ``EventLog``, and every reader — the control plane's follower, the
SSE/WebSocket routes, the training log of a finished job, a remote worker — reads them back with
``read_events``. Both files are append-only. A line torn by a kill is skipped when read, and the next writer
starts on a fresh line, so a resumed job keeps one readable stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from usf_bios.status import JobStatus

Stage = Literal["loading_model", "tokenizing", "training", "evaluating", "saving"]


def _now() -> float:
    return round(time.time(), 3)


class _Event(BaseModel):
    # unknown fields are ignored when reading (a newer engine may add some), never written by this one
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    ts: float = Field(default_factory=_now, description="Unix seconds when the engine wrote the event.")


class StageEvent(_Event):
    type: Literal["stage"] = "stage"
    stage: Stage
    total_steps: int | None = Field(None, description="On the 'training' stage: the job's optimizer steps.")


class MetricEvent(_Event):
    """One optimizer step."""

    type: Literal["metric"] = "metric"
    step: int
    epoch: float
    loss: float = Field(description="Mean cross-entropy over the step's trained tokens.")
    learning_rate: float
    grad_norm: float | None = None
    tokens: int | None = Field(None, description="The step's non-padding tokens.")
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    gpu_memory_gb: float | None = Field(None, description="torch.cuda.max_memory_allocated in GiB; null on the CPU.")


class EvalEvent(_Event):
    type: Literal["eval"] = "eval"
    step: int
    validation_loss: float


class CheckpointEvent(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class DoneEvent(_Event):
    type: Literal["done"] = "done"
    status: JobStatus
    error: str | None = None

    @field_validator("status")
    @classmethod
    def _terminal(cls, value: JobStatus) -> JobStatus:
        if not value.is_terminal:
            raise ValueError(f"a job ends completed, failed or cancelled, not {value.value}")
        return value


Event = Annotated[Union[StageEvent, MetricEvent, EvalEvent, CheckpointEvent, DoneEvent], Field(discriminator="type")]
EVENT = TypeAdapter(Event)

# what a metric point holds besides its step: the MetricEvent's measures, in order (the job store's MetricPoint
# has a column for each; tests/control check that)
METRIC_FIELDS: tuple[str, ...] = tuple(name for name in MetricEvent.model_fields if name not in ("ts", "type", "step"))


def parse_event(line: str | bytes) -> Event | None:
    """One line of an events file, or None for a torn, garbled or unknown one."""
    try:
        return EVENT.validate_json(line)
    except (ValidationError, ValueError):
        return None


def _complete_lines(path: Path, offset: int) -> Iterator[tuple[int, bytes]]:
    """(end offset, bytes) of every complete line from byte ``offset`` on; an offset inside a line starts at the
    next line, and an unfinished last line (no newline yet) is left out."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        if offset > 0:
            handle.seek(offset - 1)
            if handle.read(1) != b"\n":
                handle.readline()   # inside a line: skip to the next one
        position = handle.tell()
        for raw in handle:
            if not raw.endswith(b"\n"):
                return
            position += len(raw)
            yield position, raw


def iter_events(path: Path, offset: int = 0) -> Iterator[tuple[int, Event]]:
    """(end offset, event) for each event after byte ``offset``: the end offset is where the next line starts, so
    a reader continues from it (the SSE stream sends it as the event id). Torn or garbled lines are skipped."""
    for end, raw in _complete_lines(path, offset):
        event = parse_event(raw)
        if event is not None:
            yield end, event


def read_events_at(path: Path, offset: int = 0) -> tuple[list[tuple[int, Event]], int]:
    """(end offset, event) for the complete lines after byte ``offset``, and the offset to read from next time (an
    unfinished last line is left for then; a garbled line is skipped)."""
    events: list[tuple[int, Event]] = []
    for offset, raw in _complete_lines(path, offset):
        event = parse_event(raw)
        if event is not None:
            events.append((offset, event))
    return events, offset


def read_events(path: Path, offset: int = 0) -> tuple[list[Event], int]:
    """The events of the complete lines after byte ``offset``, and the offset to read from next time."""
    events, offset = read_events_at(path, offset)
    return [event for _, event in events], offset


def _open_append(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            handle.seek(-1, 2)
            needs_newline = handle.read(1) != b"\n"
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
        self.sinks: list[Callable[[_Event], None]] = []   # also told of every event (engine/reporters.py)

    def emit(self, event: _Event) -> _Event:
        self._events.write(event.model_dump_json() + "\n")
        for sink in self.sinks:
            sink(event)
        return event

    def log(self, message: str, echo: bool = True) -> None:
        """A line of the job's log, echoed to stdout when the log echoes (``echo=False``: the log file only)."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._log.write(line + "\n")
        if self._echo and echo:
            print(line, flush=True)

    def stage(self, stage: Stage, total_steps: int | None = None) -> None:
        self.emit(StageEvent(stage=stage, total_steps=total_steps))
        self.log(f"stage: {stage}")

    def done(self, status: JobStatus, error: str | None = None) -> None:
        self.emit(DoneEvent(status=status, error=error))
        self.log(f"done: {status.value}" + (f" — {error}" if error else ""))

    def close(self) -> None:
        self._events.close()
        self._log.close()


def training_log(events: list[Event]) -> list[dict[str, Any]]:
    """One point per step (metric and eval merged). A step redone after a resume replaces the lost one."""
    points: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, MetricEvent):
            points[event.step] = event.model_dump(mode="json", exclude={"type", "ts"})
        elif isinstance(event, EvalEvent) and event.step in points:
            points[event.step]["validation_loss"] = event.validation_loss
    return [points[step] for step in sorted(points)]
