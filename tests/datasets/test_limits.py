"""Hostile files: nesting past any sane depth, headers of tens of thousands of columns, runaway cells.

Each must end in a DatasetError naming the file and line, never RecursionError or minutes of CPU.
"""

from __future__ import annotations

import json

import pytest

from usf_bios.datasets import DatasetError, load_dataset
from usf_bios.datasets import readers
from usf_bios.datasets.readers import MAX_CSV_COLUMNS, MAX_JSON_DEPTH

OK = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
TOO_DEEP = f"nested too deeply (more than {MAX_JSON_DEPTH} levels)"


def nested(depth: int, kind: str = "array") -> str:
    """JSON text of ``depth`` levels of arrays (or objects) around a number."""
    if kind == "array":
        return "[" * depth + "1" + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


def with_extra(depth: int, kind: str = "array") -> str:
    """An otherwise valid chat record (level 1) whose extra key holds ``depth - 1`` more levels."""
    return OK[:-1] + f', "extra": {nested(depth - 1, kind)}}}'


@pytest.mark.parametrize("kind", ["array", "object"])
def test_jsonl_line_nested_100000_deep_is_a_dataset_error_naming_the_line(tmp_path, kind):
    path = tmp_path / "deep.jsonl"
    path.write_text(OK + "\n" + OK + "\n" + nested(100_000, kind) + "\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.file, info.value.line, info.value.reason) == (str(path), 3, TOO_DEEP)
    assert str(info.value) == f"{path}:3: {TOO_DEEP}"


def test_json_array_with_a_row_nested_100000_deep_names_the_line_where_it_gets_too_deep(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[\n" + OK + ",\n" + OK + ",\n" + with_extra(100_000) + "\n]\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (4, TOO_DEEP)


def test_nesting_that_json_parses_but_passes_the_limit_is_refused_too(tmp_path):
    """150 levels parse without RecursionError; they are refused all the same, before any conversion."""
    path = tmp_path / "deep.jsonl"
    path.write_text(OK + "\n" + with_extra(MAX_JSON_DEPTH + 1, "object") + "\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (2, TOO_DEEP)
    json_file = tmp_path / "deep.json"  # the array is one more level
    json_file.write_text("[" + OK + ",\n" + with_extra(MAX_JSON_DEPTH) + "]")
    with pytest.raises(DatasetError) as info:
        load_dataset(json_file)
    assert (info.value.line, info.value.reason) == (2, TOO_DEEP)


def test_nesting_up_to_the_limit_is_accepted(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(with_extra(MAX_JSON_DEPTH) + "\n" + with_extra(MAX_JSON_DEPTH, "object") + "\n")
    assert len(load_dataset(path).examples) == 2
    json_file = tmp_path / "ok.json"
    json_file.write_text("[" + with_extra(MAX_JSON_DEPTH - 1) + "]")
    assert len(load_dataset(json_file).examples) == 1


def test_a_deeply_nested_messages_cell_in_csv_names_its_line(tmp_path):
    path = tmp_path / "deep.csv"
    cell = json.dumps(json.loads(OK)["messages"]).replace('"', '""')
    path.write_text('messages\n"' + cell + '"\n"' + nested(100_000) + '"\n')
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (3, TOO_DEEP)


def test_an_integer_too_long_for_python_is_a_dataset_error(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(OK + "\n" + OK[:-1] + ', "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert info.value.line == 2 and info.value.reason.startswith("malformed JSON: Exceeds the limit")


def test_a_csv_header_of_60000_columns_is_refused_at_line_1(tmp_path):
    path = tmp_path / "wide.csv"
    header = ["text"] + [f"c{i}" for i in range(59_999)]
    path.write_text(",".join(header) + "\n" + ",".join(["hello"] + ["x"] * 59_999) + "\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (1, f"the header has 60000 columns; at most {MAX_CSV_COLUMNS}")


def test_a_header_at_the_column_limit_is_read_and_a_late_duplicate_is_still_found(tmp_path):
    header = ["text"] + [f"c{i}" for i in range(MAX_CSV_COLUMNS - 1)]
    path = tmp_path / "wide.csv"
    path.write_text(",".join(header) + "\n" + ",".join(["hello"] * MAX_CSV_COLUMNS) + "\n")
    assert load_dataset(path).examples[0].messages[0].content == "hello"
    path.write_text(",".join(header[:-1] + ["c7"]) + "\n" + ",".join(["hello"] * MAX_CSV_COLUMNS) + "\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (1, "duplicate column 'c7' in the CSV header")


def test_a_runaway_csv_cell_is_refused_with_the_likely_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_CSV_CELL_CHARS", 1000)  # the real limit is 64 Mi characters
    path = tmp_path / "quote.csv"
    path.write_text('text\n"fine"\n"an unclosed quote swallows the rest\n' + "more text\n" * 200)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert (info.value.line, info.value.reason) == (3, "a cell is longer than 1,000 characters (an unclosed quote?)")
