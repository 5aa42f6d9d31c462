"""Reading JSONL / JSON / CSV files into numbered records.

- JSONL: one JSON object per line; blank lines are skipped; numbers are file lines.
- JSON: an array of objects, or an object whose only key is "data" holding such an
  array; numbers are 1-based rows of the array. Read whole (json cannot stream).
- CSV: a header row, then one record per row; numbers are the file line the row
  starts on (header = line 1). A "messages" or "conversations" column holds JSON
  text and is parsed; an empty cell there leaves the field out.

All files must be UTF-8; a leading BOM is skipped. JSONL and CSV stream.

Limits, each refused with a DatasetError naming the file and line: JSON nested more than
``MAX_JSON_DEPTH`` levels (a record, its arrays and objects; a JSON file's top-level array and a
``{"data": ...}`` around it count as one each), a CSV header of more than ``MAX_CSV_COLUMNS`` columns, a CSV cell of more than
``MAX_CSV_CELL_CHARS`` characters.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from usf_bios.datasets.formats import DatasetError, json_type

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv")
MAX_JSON_DEPTH = 100            # a chat record needs 3 levels (record, messages, turn); tool calls a few more
MAX_CSV_COLUMNS = 1024
MAX_CSV_CELL_CHARS = 64 << 20   # long training texts exceed csv's 128 KiB default; an unclosed quote stops here

_BOM = b"\xef\xbb\xbf"
_CHAT_COLUMNS = ("messages", "conversations")
_FLAT_COLUMNS = (("instruction", "output"), ("prompt", "completion"), ("text",))
_CSV_HINT = "expected one of: instruction+output (alpaca), prompt+completion (prompt_completion), text (text)"


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line or row number, record); raises DatasetError.

    A missing file or unsupported suffix raises at once; content errors raise while
    iterating; a file that yields no record raises "the file has no records" at the end.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "file not found")
    if not path.is_file():
        raise DatasetError(path, "not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        shown = f"'{path.suffix}'" if path.suffix else "(no suffix)"
        raise DatasetError(
            path, f"unsupported file type {shown} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
    return _require_records(path, reader(path))


def _require_records(path: Path, records: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    seen = False
    for item in records:
        seen = True
        yield item
    if not seen:
        raise DatasetError(path, "the file has no records")


def _utf8_error(path: Path, line_bytes: bytes, pos: int, line: int) -> DatasetError:
    """The error for an invalid byte at `pos` of one line; the column counts characters."""
    column = len(line_bytes[:pos].decode("utf-8")) + 1
    return DatasetError(path, f"not valid UTF-8 (byte 0x{line_bytes[pos]:02x} at column {column})", line)


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each physical line, BOM removed from line 1."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DatasetError(path, f"cannot read the file ({exc.strerror})") from exc
    with f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            yield number, raw


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    for number, raw in _raw_lines(path):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, raw, exc.start, number) from None


_JSON_NESTING_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep_at(text: str, limit: int) -> int:
    """The offset in ``text`` of the first bracket that opens level ``limit + 1`` (strings skipped), else -1.

    Called only on text that json parsed at least that far, so every string before that point is closed.
    """
    depth = 0
    for token in _JSON_NESTING_TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth > limit:
                return token.start()
        elif char in "]}":
            depth -= 1
    return -1


def _deeper_than(value: object, limit: int) -> bool:
    """Whether a parsed JSON value nests arrays/objects more than ``limit`` levels (level by level: never recurses)."""
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        below = []
        for item in level:
            for child in (item.values() if isinstance(item, dict) else item):  # type: ignore[union-attr]
                if isinstance(child, (dict, list)):
                    below.append(child)
        level, depth = below, depth + 1
    return False


def _where(text: str, pos: int, here: int) -> str:
    """'column 7', or 'line 3, column 7' when ``pos`` lies on another line of ``text`` than ``here``."""
    line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    return f"column {column}" if line == text.count("\n", 0, here) + 1 else f"line {line}, column {column}"


def _json_fault(text: str, exc: json.JSONDecodeError) -> str:
    """What is wrong where ``json`` stopped, pointing at the real fault when it can be told: the text ends with a
    bracket still open (the column of that bracket), a comma before a closing bracket (the comma's column), a
    bracket closed by the other kind (both columns). Otherwise json's own message and column."""
    pos, opened, in_string, escaped = exc.pos, [], False, False
    for i, char in enumerate(text[:pos]):
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            opened.append(i)
        elif char in "]}" and opened:
            opened.pop()
    rest = text[pos:].strip()
    if not rest and opened and not in_string:
        start = opened[-1]
        end = max(len(text.rstrip()) - 1, 0)      # the last character, not the line break after it
        return f"the text ends before the '{text[start]}' opened at {_where(text, start, end)} is closed"
    if rest[:1] in ("]", "}"):
        before = text[:pos].rstrip()
        if before.endswith(","):
            return f"a trailing comma at {_where(text, len(before) - 1, pos)}, before '{rest[0]}'"
        if opened and {"[": "]", "{": "}"}[text[opened[-1]]] != rest[0]:
            return (f"'{rest[0]}' at column {exc.colno} closes the '{text[opened[-1]]}' opened at "
                    f"{_where(text, opened[-1], pos)}")
    return f"{exc.msg} (column {exc.colno})"


def _parse_json(path: Path, text: str, line: int | None, what: str = "JSON") -> object:
    """``json.loads`` that raises only DatasetError, at ``line`` (or, when None, the line of the fault in ``text``).

    Nesting deeper than MAX_JSON_DEPTH is refused here, so no later code (conversion, messages, the server's
    JSON answers) ever recurses on it; deeper than the interpreter's stack would raise RecursionError inside
    ``json.loads`` itself, which is caught and given the same reason.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"malformed {what}: {_json_fault(text, exc)}",
                           exc.lineno if line is None else line) from None
    except RecursionError:
        value = None
        too_deep = True
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DatasetError(path, f"malformed {what}: {exc}", line) from None
    else:
        # each level opens a bracket, so text with few of them cannot be too deep (the usual record: no walk)
        too_deep = (text.count("[") + text.count("{") > MAX_JSON_DEPTH and isinstance(value, (dict, list))
                    and _deeper_than(value, MAX_JSON_DEPTH))
    if too_deep:
        if line is None:
            at = _too_deep_at(text, MAX_JSON_DEPTH)
            line = text.count("\n", 0, at) + 1 if at >= 0 else None
        raise DatasetError(path, f"nested too deeply (more than {MAX_JSON_DEPTH} levels)", line)
    return value


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for number, text in _text_lines(path):
        if not text.strip():
            continue
        value = _parse_json(path, text, number)
        if not isinstance(value, dict):
            raise DatasetError(path, f"expected a JSON object, got {json_type(value)}", number)
        yield number, value


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(path, f"cannot read the file ({exc.strerror})") from exc
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise _utf8_error(path, data[start:], exc.start - start, line) from None
    if not text.strip():
        return
    value = _parse_json(path, text, None)
    if isinstance(value, dict) and list(value) == ["data"]:
        value = value["data"]
    if not isinstance(value, list):
        raise DatasetError(
            path, f'expected a JSON array of objects (or {{"data": [...]}}), got {json_type(value)}'
        )
    for row, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DatasetError(path, f"expected a JSON object, got {json_type(item)}", row, unit="row")
        yield row, item


def _check_header(path: Path, header: list[str], line: int) -> None:
    if len(header) > MAX_CSV_COLUMNS:
        raise DatasetError(path, f"the header has {len(header)} columns; at most {MAX_CSV_COLUMNS}", line)
    columns: set[str] = set()
    for name in header:
        if name in columns:
            raise DatasetError(path, f"duplicate column '{name}' in the CSV header", line)
        if name:
            columns.add(name)
    if columns & set(_CHAT_COLUMNS) or any(columns >= set(need) for need in _FLAT_COLUMNS):
        return
    raise DatasetError(path, f"CSV has columns [{', '.join(header)}]; {_CSV_HINT}", line)


def _csv_record(path: Path, header: list[str], row: list[str], line: int) -> dict:
    record = dict(zip(header, row))
    for column in _CHAT_COLUMNS:
        if column not in record:
            continue
        cell = record.pop(column)
        if not cell.strip():
            continue
        record[column] = _parse_json(path, cell, line, what=f"JSON in column '{column}'")
    return record


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(MAX_CSV_CELL_CHARS)  # process-wide; nothing else in the package reads CSV
    reader = csv.reader(text for _, text in _text_lines(path))
    header: list[str] | None = None
    previous = 0
    try:
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(path, header, start)
                continue
            if len(row) != len(header):
                raise DatasetError(
                    path, f"row has {len(row)} cells but the header has {len(header)} columns", start
                )
            yield start, _csv_record(path, header, row, start)
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):  # named at the line its row starts on
            reason = f"a cell is longer than {MAX_CSV_CELL_CHARS:,} characters (an unclosed quote?)"
            raise DatasetError(path, reason, previous + 1) from None
        raise DatasetError(path, f"malformed CSV: {exc}", reader.line_num) from None
