"""Parsing of the five formats from JSONL, JSON and CSV into Examples."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest

from usf_bios.datasets import (
    FORMATS,
    DatasetError,
    Example,
    Message,
    detect_format,
    load_dataset,
    read_records,
    to_example,
)

S, U, A = "system", "user", "assistant"


def msgs(*pairs: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


# format -> (two records, their expected messages, templated)
CASES: dict[str, tuple[list[dict], list[tuple[Message, ...]], bool]] = {
    "messages": (
        [
            {"messages": [
                {"role": S, "content": "Be terse."},
                {"role": U, "content": "2+2?"},
                {"role": A, "content": "4"},
            ]},
            {"messages": [
                {"role": U, "content": "Hi"},
                {"role": A, "content": "Hello"},
                {"role": U, "content": "Bye"},
                {"role": A, "content": "Bye!"},
            ]},
        ],
        [
            msgs((S, "Be terse."), (U, "2+2?"), (A, "4")),
            msgs((U, "Hi"), (A, "Hello"), (U, "Bye"), (A, "Bye!")),
        ],
        True,
    ),
    "sharegpt": (
        [
            {"system": "Be kind.", "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]},
            {"system": "", "conversations": [
                {"from": "system", "value": "Sys"},
                {"from": "user", "value": "Q"},
                {"from": "assistant", "value": "A"},
            ]},
        ],
        [
            msgs((S, "Be kind."), (U, "Hi"), (A, "Hello")),
            msgs((S, "Sys"), (U, "Q"), (A, "A")),
        ],
        True,
    ),
    "alpaca": (
        [
            {"instruction": "Translate to French", "input": "cat", "output": "chat", "system": ""},
            {"instruction": "Say hi", "input": "", "output": "hi", "system": "You are polite."},
        ],
        [
            msgs((U, "Translate to French\n\ncat"), (A, "chat")),
            msgs((S, "You are polite."), (U, "Say hi"), (A, "hi")),
        ],
        True,
    ),
    "prompt_completion": (
        [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "1, 2,", "completion": " 3"}],
        [msgs((U, "The sky is"), (A, " blue.")), msgs((U, "1, 2,"), (A, " 3"))],
        False,
    ),
    "text": (
        [{"text": "Once upon a time."}, {"text": "line one\nline two"}],
        [msgs((A, "Once upon a time.")), msgs((A, "line one\nline two"))],
        False,
    ),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    columns = list(records[0])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for record in records:
        writer.writerow(
            [json.dumps(v) if isinstance(v, list) else v for v in (record[c] for c in columns)]
        )
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    return path


WRITERS = {".jsonl": (write_jsonl, [1, 2]), ".json": (write_json, [1, 2]), ".csv": (write_csv, [2, 3])}


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("explicit", [False, True])
def test_each_format_each_file_type(tmp_path, fmt, suffix, explicit):
    records, expected, templated = CASES[fmt]
    write, lines = WRITERS[suffix]
    path = write(tmp_path / f"data{suffix}", records)
    loaded = load_dataset(path, fmt if explicit else "auto")
    assert loaded.format == fmt
    assert loaded.path == path
    assert loaded.examples == [
        Example(messages=m, templated=templated, line=n) for m, n in zip(expected, lines)
    ]


def test_sha256_matches_file_bytes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", CASES["text"][0])
    assert load_dataset(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    assert load_dataset(path).format == "prompt_completion"
    loaded = load_dataset(path, "text")
    assert loaded.format == "text"
    assert loaded.examples == [Example(msgs((A, "t")), False, 1)]


def test_extra_keys_ignored(tmp_path):
    records = [
        {"id": 7, "meta": {"source": "x"}, "messages": [
            {"role": U, "content": "q", "name": "bob"}, {"role": A, "content": "a", "weight": 1}]},
    ]
    loaded = load_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    assert loaded.examples == [Example(msgs((U, "q"), (A, "a")), True, 1)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,text,source\n1,hello,web\n", encoding="utf-8")
    assert load_dataset(csv_path).examples == [Example(msgs((A, "hello")), False, 2)]


def test_alpaca_input_missing_or_null(tmp_path):
    records = [{"instruction": "Do", "output": "done"}, {"instruction": "Do", "input": None, "output": "ok"}]
    loaded = load_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    assert [e.messages for e in loaded.examples] == [
        msgs((U, "Do"), (A, "done")), msgs((U, "Do"), (A, "ok"))]


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_bom_accepted(tmp_path, suffix):
    write, lines = WRITERS[suffix]
    path = write(tmp_path / f"d{suffix}", CASES["text"][0])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded = load_dataset(path)
    assert loaded.format == "text"
    assert [e.line for e in loaded.examples] == lines
    assert loaded.examples[0].messages == msgs((A, "Once upon a time."))


def test_jsonl_blank_lines_keep_true_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n\n   \n{"text": "b"}\r\n\n', encoding="utf-8")
    loaded = load_dataset(path)
    assert [(e.line, e.messages) for e in loaded.examples] == [(2, msgs((A, "a"))), (5, msgs((A, "b")))]


def test_csv_blank_lines_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('\ntext\n"multi\nline"\n\nsecond\r\n', encoding="utf-8", newline="")
    loaded = load_dataset(path)
    assert [(e.line, e.messages) for e in loaded.examples] == [
        (3, msgs((A, "multi\nline"))), (6, msgs((A, "second")))]


def test_json_object_with_data_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    assert [(e.line, e.messages) for e in load_dataset(path).examples] == [
        (1, msgs((A, "a"))), (2, msgs((A, "b")))]


def test_read_records_streams(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n', encoding="utf-8")
    records = read_records(path)
    assert next(records) == (1, {"text": "a"})
    assert next(records) == (2, {"text": "b"})
    with pytest.raises(DatasetError) as err:
        next(records)
    assert err.value.line == 3


def test_csv_chat_column_parsed(tmp_path):
    path = tmp_path / "d.csv"
    cell = json.dumps([{"role": U, "content": "q"}, {"role": A, "content": "a"}])
    path.write_text("messages,id\n" + '"' + cell.replace('"', '""') + '",1\n', encoding="utf-8")
    assert list(read_records(path)) == [
        (2, {"id": "1", "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]})]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [], "text": "x"}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "i", "output": "o", "text": "t"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t", "id": 1}, "text"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize("record", [{}, {"instruction": "i"}, {"prompt": "p", "answer": "a"}])
def test_detect_format_rejects(record):
    with pytest.raises(ValueError, match="cannot detect the format"):
        detect_format(record)


def test_to_example_direct():
    example = to_example({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", 9)
    assert example == Example(msgs((U, "Sum\n\n1 2"), (A, "3")), True, 9)
    with pytest.raises(ValueError, match="missing field 'completion'"):
        to_example({"prompt": "p"}, "prompt_completion", 1)
    with pytest.raises(ValueError, match="unknown format"):
        to_example({"text": "t"}, "markdown", 1)


def test_dataset_error_str_and_pickle():
    assert str(DatasetError("data.jsonl", "bad", 7)) == "data.jsonl:7: bad"
    assert str(DatasetError(Path("d.json"), "bad", 2, unit="row")) == "d.json: row 2: bad"
    assert str(DatasetError("d.csv", "bad")) == "d.csv: bad"
    err = pickle.loads(pickle.dumps(DatasetError("d.json", "bad", 2, unit="row")))
    assert (err.file, err.line, err.reason, err.unit, str(err)) == ("d.json", 2, "bad", "row", "d.json: row 2: bad")
    assert isinstance(err, ValueError)


def test_load_dataset_rejects_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(path, "markdown")  # type: ignore[arg-type]
