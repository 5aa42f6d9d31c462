"""Reading JSONL / JSON / CSV files into numbered records.

- JSONL: one JSON object per line; blank lines are skipped; numbers are file lines.
- JSON: an array of objects, or an object whose only key is "data" holding such an
  array; numbers are 1-based rows of the array. Read whole (json cannot stream).
- CSV: a header row, then one record per row; numbers are the file line the row
  starts on (header = line 1). A "messages" or "conversations" column holds JSON
  text and is parsed; an empty cell there leaves the field out.

All files must be UTF-8; a leading BOM is skipped. JSONL and CSV stream.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from usf_bios.datasets.formats import DatasetError, json_type

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv")

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


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for number, text in _text_lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"malformed JSON: {exc.msg} (column {exc.colno})", number) from None
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
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"malformed JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
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
    named = [name for name in header if name]
    for name in named:
        if named.count(name) > 1:
            raise DatasetError(path, f"duplicate column '{name}' in the CSV header", line)
    columns = set(named)
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
        try:
            record[column] = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                path, f"malformed JSON in column '{column}': {exc.msg} (column {exc.colno})", line
            ) from None
    return record


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long training texts exceed the 128 KiB default
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
        raise DatasetError(path, f"malformed CSV: {exc}", reader.line_num) from None
