"""Fuzz the dataset readers and formats with atheris: every input must load or raise DatasetError.

    python scripts/fuzz_datasets.py -max_total_time=600 fuzz-corpus/    # ten minutes; the folder keeps the corpus
    python scripts/fuzz_datasets.py -runs=20000                          # a fixed number of inputs

Arguments are libFuzzer's (``-help=1`` lists them). An input's first byte picks the file type (.jsonl, .json,
.csv) and the ``dataset_format``; the rest is the file. Any exception other than DatasetError is a crash:
atheris prints the input and its traceback, writes it to ``crash-*`` and exits non-zero. Without a corpus
folder one is made in a temporary folder; an empty one is seeded with a valid file of each format and a few
nested and CSV shapes, and the field names of the formats are given as a dictionary (``-dict``).
tests/datasets/test_fuzz.py runs this for 15 seconds. ``-rss_limit_mb`` reads the peak RSS, which Linux keeps
across exec: started straight from a large process (a pytest worker with torch loaded), the fuzzer begins at that
process's peak; start it from a shell (the test goes through ``sh``).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["usf_bios.datasets"]):
    from usf_bios.datasets import DatasetError, load_dataset

SUFFIXES = (".jsonl", ".json", ".csv")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
WORDS = ("messages", "role", "content", "system", "user", "assistant", "conversations", "from", "value", "human",
         "gpt", "instruction", "input", "output", "prompt", "completion", "text", "data")
_CHAT = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
SEEDS = {  # (file type, format) index byte, then the file
    "messages.jsonl": bytes([0]) + _CHAT + b"\n" + _CHAT + b"\n",
    "sharegpt.jsonl": bytes([0]) + b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],'
                                   b' "system": "s"}\n',
    "alpaca.json": bytes([1]) + b'{"data": [{"instruction": "i", "input": "x", "output": "o"}]}',
    "prompt.json": bytes([1]) + b'[{"prompt": "p", "completion": "c"}]',
    "text.csv": bytes([2]) + b'text\n"a ""quoted"" text"\nplain\n',
    "alpaca.csv": bytes([2]) + b"instruction,input,output\ni,,o\n",
    "messages.csv": bytes([2]) + b'messages\n"[{""role"": ""user"", ""content"": ""q""}, '
                                 b'{""role"": ""assistant"", ""content"": ""a""}]"\n',
    "nested.jsonl": bytes([0]) + _CHAT[:-1] + b', "x": ' + b"[" * 120 + b"]" * 120 + b"}\n",
    "deep.json": bytes([1]) + b"[" * 3000 + b"]" * 3000,
    "bom.jsonl": bytes([0]) + b"\xef\xbb\xbf" + b'{"text": "t"}\n\n{"text": "\\u00e9"}\n',
}
_WORK = Path(tempfile.mkdtemp(prefix="usf-fuzz-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    path = _WORK / f"input{SUFFIXES[data[0] % 3]}"
    path.write_bytes(data[1:])
    try:
        load_dataset(path, FORMATS[(data[0] // 3) % len(FORMATS)])  # type: ignore[arg-type]
    except DatasetError:
        pass


def main(argv: list[str]) -> None:
    args = list(argv)
    corpora = [a for a in args[1:] if not a.startswith("-")]
    if not corpora:
        corpus = _WORK / "corpus"
        corpus.mkdir()
        args.append(str(corpus))
        corpora = [str(corpus)]
    first = Path(corpora[0])
    first.mkdir(parents=True, exist_ok=True)
    if not any(first.iterdir()):
        for name, content in SEEDS.items():
            (first / name).write_bytes(content)
    if not any(a.startswith("-dict=") for a in args):
        dictionary = _WORK / "datasets.dict"
        dictionary.write_text("".join(f'"\\"{w}\\""\n' for w in WORDS) + '"["\n"{"\n"]"\n"}"\n"\\\\u"\n')
        args.append(f"-dict={dictionary}")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
