"""Dataset formats: the single internal shape, format detection and conversion."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DatasetFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
Role = Literal["system", "user", "assistant"]

_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_DETECT_HINT = (
    "expected one of: messages (messages), conversations (sharegpt), instruction+output (alpaca), "
    "prompt+completion (prompt_completion), text (text)"
)


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """One training example in the single internal shape."""

    messages: tuple[Message, ...]
    templated: bool  # True: rendered with the model's chat template; False: plain text concatenation
    line: int  # the line (JSONL, CSV) or row (JSON array, 1-based) it came from


class DatasetError(ValueError):
    """A dataset file problem, located by file and line (or row)."""

    def __init__(
        self, file: str | Path, reason: str, line: int | None = None, *, unit: str = "line"
    ) -> None:
        if unit not in ("line", "row"):
            raise ValueError(f"unit must be 'line' or 'row', got {unit!r}")
        self.file = str(file)
        self.reason = reason
        self.line = line
        self.unit = unit
        if line is None:
            message = f"{self.file}: {reason}"
        elif unit == "row":
            message = f"{self.file}: row {line}: {reason}"
        else:
            message = f"{self.file}:{line}: {reason}"
        super().__init__(message)

    def __reduce__(self):  # keep the error picklable (e.g. across worker processes)
        return (_rebuild_error, (self.__class__, self.file, self.reason, self.line, self.unit))


def _rebuild_error(cls: type[DatasetError], file: str, reason: str, line: int | None, unit: str):
    return cls(file, reason, line, unit=unit)


@dataclass(frozen=True)
class LoadedDataset:
    """A fully validated dataset file."""

    path: Path
    format: str  # the detected/used format, never "auto"
    examples: list[Example]
    sha256: str  # sha256 hex of the file's bytes


class _MissingField(ValueError):
    """A field required by the format is absent."""


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def detect_format(record: dict) -> str:
    """The format a record is in, judged by its keys; ValueError if none fits."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(str(k) for k in record)
    raise ValueError(f"cannot detect the format from keys [{keys}]; {_DETECT_HINT}")


def to_example(record: dict, fmt: str, line: int) -> Example:
    """Convert one record in format `fmt` to an Example; ValueError(reason) on bad content."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "messages":
        turns = _turns(record, "messages", "role", "content", _MESSAGE_ROLES, "system, user or assistant")
        return Example(_check_chat(turns), True, line)
    if fmt == "sharegpt":
        turns = _turns(
            record, "conversations", "from", "value", _SHAREGPT_ROLES,
            "system, human, user, gpt or assistant",
        )
        system = _optional_text(record, "system")
        if system.strip():
            turns.insert(0, (Message("system", system), "system"))
        return Example(_check_chat(turns), True, line)
    if fmt == "alpaca":
        instruction = _text(record, "instruction", fmt)
        output = _text(record, "output", fmt)
        extra = _optional_text(record, "input")
        system = _optional_text(record, "system")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [Message("system", system)] if system.strip() else []
        messages += [Message("user", user), Message("assistant", output)]
        return Example(tuple(messages), True, line)
    if fmt == "prompt_completion":
        prompt = _text(record, "prompt", fmt)
        completion = _text(record, "completion", fmt)
        return Example((Message("user", prompt), Message("assistant", completion)), False, line)
    if fmt == "text":
        return Example((Message("assistant", _text(record, "text", fmt)),), False, line)
    raise ValueError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")


def load_dataset(path: str | Path, fmt: DatasetFormat = "auto") -> LoadedDataset:
    """Read and validate a whole file; every problem raises DatasetError, nothing partial is returned.

    With fmt="auto" the format is detected from the first record and every later
    record must be in that same format.
    """
    from usf_bios.datasets.readers import read_records  # readers imports DatasetError from here

    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected auto or one of: {', '.join(FORMATS)})")
    path = Path(path)
    unit = "row" if path.suffix.lower() == ".json" else "line"
    used: str | None = None if fmt == "auto" else fmt
    examples: list[Example] = []
    for line, record in read_records(path):
        try:
            if used is None:
                used = detect_format(record)
            examples.append(to_example(record, used, line))
        except ValueError as exc:
            reason = str(exc)
            if fmt == "auto" and isinstance(exc, _MissingField):
                reason += " (format detected from the first record)"
            raise DatasetError(path, reason, line, unit=unit) from exc
    assert used is not None  # read_records raises on a file without records
    return LoadedDataset(path=path, format=used, examples=examples, sha256=_sha256(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _text(record: dict, key: str, fmt: str) -> str:
    """A required, non-empty string field."""
    if key not in record:
        raise _MissingField(f"missing field '{key}' required by the {fmt} format")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {json_type(value)}")
    if not value.strip():
        raise ValueError(f"'{key}' is empty" + (" (whitespace only)" if value else ""))
    return value


def _optional_text(record: dict, key: str) -> str:
    """An optional string field; missing or null reads as ""."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {json_type(value)}")
    return value


def _turns(
    record: dict, field: str, role_key: str, text_key: str, roles: dict[str, str], allowed: str
) -> list[tuple[Message, str]]:
    """Parse a list of chat turns into (Message, location label) pairs."""
    fmt = "messages" if field == "messages" else "sharegpt"
    if field not in record:
        raise _MissingField(f"missing field '{field}' required by the {fmt} format")
    turns = record[field]
    if not isinstance(turns, list):
        raise ValueError(f"'{field}' must be a list of objects, got {json_type(turns)}")
    if not turns:
        raise ValueError(f"'{field}' is empty")
    out: list[tuple[Message, str]] = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object, got {json_type(turn)}")
        if role_key not in turn:
            raise ValueError(f"{where} has no '{role_key}'")
        role = turn[role_key]
        if not isinstance(role, str):
            raise ValueError(f"{where}.{role_key} must be a string, got {json_type(role)}")
        if role not in roles:
            raise ValueError(f"unknown role '{role}' in {where} (expected {allowed})")
        if text_key not in turn:
            raise ValueError(f"{where} has no '{text_key}'")
        text = turn[text_key]
        if not isinstance(text, str):
            raise ValueError(f"{where}.{text_key} must be a string, got {json_type(text)}")
        if not text.strip():
            raise ValueError(f"{where}.{text_key} is empty" + (" (whitespace only)" if text else ""))
        out.append((Message(roles[role], text), where))  # type: ignore[arg-type]
    return out


def _check_chat(turns: list[tuple[Message, str]]) -> tuple[Message, ...]:
    """Enforce: system only first, user/assistant alternate, at least one and the last from the assistant."""
    for message, where in turns[1:]:
        if message.role == "system":
            raise ValueError(f"a system message is only allowed first, found one at {where}")
    roles = [message.role for message, _ in turns]
    if "assistant" not in roles:
        raise ValueError("no assistant message; at least one is required")
    if roles[-1] != "assistant":
        raise ValueError(
            "the last message must be from the assistant; trailing user turns would train nothing"
        )
    body = turns[1:] if roles[0] == "system" else turns
    for k, (message, where) in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message.role != expected:
            raise ValueError(
                f"roles must alternate user/assistant after the optional system message: "
                f"expected {expected} at {where}, got {message.role}"
            )
    return tuple(message for message, _ in turns)
