"""A corpus of broken dataset files: each must fail with the exact line/row and a clear reason."""

from __future__ import annotations

import json

import pytest

from usf_bios.datasets import DatasetError, load_dataset


def chat(*turns: tuple[str, object]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode() + b"\n"


OK = chat(("user", "q"), ("assistant", "a"))
TEXT = b'{"text": "fine"}\n'

# id -> (file name, bytes, fmt, expected line, expected unit, reason substring)
CASES: dict[str, tuple[str, bytes, str, int | None, str, str]] = {
    "malformed_json_line3": (
        "d.jsonl", OK + OK + b'{"messages": [}\n', "auto", 3, "line",
        "malformed JSON: '}' at column 15 closes the '[' opened at column 14"),
    "malformed_json_in_json_file": (
        "d.json", b'[\n {"text": "a"},\n {"text": "b",}\n]', "auto", 3, "line",
        "malformed JSON: a trailing comma at column 14, before '}'"),
    # the column names the real fault where the parser can tell (issue 18, item 10), not where json stopped
    "json_line_cut_short": (
        "d.jsonl", OK + b'{"messages": [{"role": "user", "content": "hi"}\n', "auto", 2, "line",
        "malformed JSON: the text ends before the '[' opened at column 14 is closed"),
    "json_trailing_comma": (
        "d.jsonl", b'{"text": "a",}\n', "auto", 1, "line", "malformed JSON: a trailing comma at column 13, before '}'"),
    "json_bracket_in_a_string_is_not_counted": (
        "d.jsonl", b'{"text": "[x", "y": [1}\n', "auto", 1, "line",
        "malformed JSON: '}' at column 23 closes the '[' opened at column 21"),
    "json_comma_missing": (
        "d.jsonl", b'{"text": "a" "b": 1}\n', "auto", 1, "line", "malformed JSON: Expecting ',' delimiter (column 14)"),
    "missing_field_alpaca": (
        "d.jsonl", b'{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', "auto", 2, "line",
        "missing field 'output'"),
    "missing_field_explicit_format": (
        "d.jsonl", TEXT + TEXT + b'{"prompt": "p", "completion": "c"}\n', "text", 3, "line",
        "missing field 'text' required by the text format"),
    "missing_field_explicit_format_json": (
        "d.json", b'[{"prompt": "p", "completion": "c"}, {"prompt": "p"}]', "prompt_completion", 2, "row",
        "missing field 'completion'"),
    "unknown_role": (
        "d.jsonl", OK + chat(("user", "q"), ("bot", "a")), "auto", 2, "line",
        "unknown role 'bot' in messages[1] (expected system, user or assistant)"),
    "unknown_role_sharegpt": (
        "d.jsonl", b'{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}\n',
        "auto", 1, "line", "unknown role 'robot' in conversations[1]"),
    "empty_content": (
        "d.jsonl", chat(("user", ""), ("assistant", "a")), "auto", 1, "line", "messages[0].content is empty"),
    "whitespace_only_content": (
        "d.jsonl", OK + OK + chat(("user", "q"), ("assistant", " \n\t")), "auto", 3, "line",
        "messages[1].content is empty (whitespace only)"),
    "whitespace_only_text": ("d.jsonl", b'{"text": "   "}\n', "auto", 1, "line", "'text' is empty"),
    "no_assistant_message": (
        "d.jsonl", OK + chat(("system", "s"), ("user", "q")), "auto", 2, "line", "no assistant message"),
    "last_message_from_user": (
        "d.jsonl", chat(("user", "q"), ("assistant", "a"), ("user", "more?")), "auto", 1, "line",
        "the last message must be from the assistant; trailing user turns would train nothing"),
    "system_not_first": (
        "d.jsonl", chat(("user", "q"), ("system", "s"), ("assistant", "a")), "auto", 1, "line",
        "a system message is only allowed first, found one at messages[1]"),
    "non_alternating_roles": (
        "d.jsonl", OK + chat(("system", "s"), ("user", "q"), ("user", "q2"), ("assistant", "a")), "auto", 2,
        "line", "expected assistant at messages[2], got user"),
    "starts_with_assistant": (
        "d.jsonl", chat(("assistant", "hi"), ("user", "q"), ("assistant", "a")), "auto", 1, "line",
        "expected user at messages[0], got assistant"),
    "wrong_content_type": (
        "d.jsonl", chat(("user", 42), ("assistant", "a")), "auto", 1, "line",
        "messages[0].content must be a string, got number"),
    "messages_is_string": (
        "d.jsonl", b'{"messages": "hello"}\n', "auto", 1, "line", "'messages' must be a list of objects, got string"),
    "messages_empty_list": ("d.jsonl", b'{"messages": []}\n', "auto", 1, "line", "'messages' is empty"),
    "message_not_object": (
        "d.jsonl", b'{"messages": ["hi", {"role": "assistant", "content": "a"}]}\n', "auto", 1, "line",
        "messages[0] must be an object, got string"),
    "completion_wrong_type": (
        "d.json", b'[{"prompt": "p", "completion": null}]', "auto", 1, "row", "'completion' must be a string, got null"),
    "non_utf8_jsonl_line4": (
        "d.jsonl", TEXT * 3 + b'{"text": "caf\xe9 \xff"}\n', "auto", 4, "line",
        "not valid UTF-8 (byte 0xe9 at column 14)"),
    "non_utf8_json": (
        "d.json", b'[\n {"text": "a"},\n {"text": "\xc3\xa9\xff"}\n]', "auto", 3, "line",
        "not valid UTF-8 (byte 0xff at column 13)"),
    "non_utf8_csv": (
        "d.csv", b"prompt,completion\np,c\n\"multi\nline\",ok\nbad \xff,c\n", "auto", 5, "line",
        "not valid UTF-8 (byte 0xff at column 5)"),
    "csv_missing_columns": (
        "d.csv", b"question,answer\nq,a\n", "auto", 1, "line",
        "CSV has columns [question, answer]; expected one of: instruction+output (alpaca), "
        "prompt+completion (prompt_completion), text (text)"),
    "csv_malformed_json_cell": (
        "d.csv", b'messages\n"[{""role"": ""user""}"\n', "auto", 2, "line", "malformed JSON in column 'messages'"),
    "csv_cell_count": ("d.csv", b"prompt,completion\np,c\np,c,extra\n", "auto", 3, "line", "3 cells"),
    "csv_header_only": ("d.csv", b"text\n\n", "auto", None, "line", "the file has no records"),
    "empty_file": ("d.jsonl", b"", "auto", None, "line", "the file has no records"),
    "empty_json": ("d.json", b"  \n", "auto", None, "line", "the file has no records"),
    "empty_json_array": ("d.json", b"[]", "auto", None, "line", "the file has no records"),
    "only_blank_lines": ("d.jsonl", b"\n   \n\t\n\r\n", "auto", None, "line", "the file has no records"),
    "jsonl_line_is_array": ("d.jsonl", TEXT + b"[1, 2]\n", "auto", 2, "line", "expected a JSON object, got array"),
    "json_object_not_array": (
        "d.json", b'{"text": "a"}', "auto", None, "line", "expected a JSON array of objects"),
    "json_non_object_row2": (
        "d.json", b'[{"text": "a"}, "b", {"text": "c"}]', "auto", 2, "row", "expected a JSON object, got string"),
    "other_format_after_autodetect": (
        "d.jsonl", OK + OK + TEXT, "auto", 3, "line",
        "missing field 'messages' required by the messages format (format detected from the first record)"),
    "other_format_after_autodetect_json": (
        "d.json", b'[{"text": "a"}, {"prompt": "p", "completion": "c"}]', "auto", 2, "row", "missing field 'text'"),
    "undetectable_first_record": ("d.jsonl", b'{"question": "q"}\n', "auto", 1, "line", "cannot detect the format"),
    "unsupported_suffix": ("d.txt", b"hello\n", "auto", None, "line", "unsupported file type '.txt' (supported: "),
}


@pytest.mark.parametrize(("name", "data", "fmt", "line", "unit", "reason"), list(CASES.values()), ids=list(CASES))
def test_broken_file(tmp_path, name, data, fmt, line, unit, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        load_dataset(path, fmt)  # type: ignore[arg-type]
    err = caught.value
    assert reason in err.reason
    assert (err.file, err.line, err.unit) == (str(path), line, unit)
    if line is None:
        assert str(err) == f"{path}: {err.reason}"
    elif unit == "row":
        assert str(err) == f"{path}: row {line}: {err.reason}"
    else:
        assert str(err) == f"{path}:{line}: {err.reason}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert (caught.value.line, caught.value.reason) == (None, "file not found")
    assert str(caught.value) == f"{path}: file not found"


def test_directory_is_not_a_file(tmp_path):
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset(path)
