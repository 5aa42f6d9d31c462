"""Every Python snippet of the README and of docs/ runs as pasted (issue 18, item 2): a job is trained on a tiny
model under the default storage root (``~/.usf-bios``, with HOME pointing at a fresh folder), ``JOB_ID`` — the
one placeholder a snippet may hold, the id ``usf-bios train`` prints — is replaced by that job's id, and each
snippet runs in a fresh Python process. A block fenced ```python server talks to a running `usf-bios serve` (the
OpenAI client's flow, which tests/api/test_openai.py runs with the official client against a real server) and is
left out here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_snippets() -> list[tuple[str, str]]:
    """(where, code) for each ```python block of README.md and docs/*.md, its list indentation removed."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[:match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", textwrap.dedent(match["body"])))
    return found


SNIPPETS = python_snippets()


def test_the_readme_has_the_peft_snippet():
    assert any(where.startswith("README.md") and "PeftModel.from_pretrained" in code for where, code in SNIPPETS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_template) -> tuple[dict[str, str], str]:
    """(environment with HOME at a fresh folder, the id of a job trained there with `usf-bios train`)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("USF_") and k not in (
        "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "HF_HOME", "TRANSFORMERS_CACHE", "MODELSCOPE_CACHE",
        "SUPPORTED_MODEL_SOURCES", "DATABASE_URL")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1")
    shutil.copytree(tiny_model_template, home / ".usf-bios" / "models" / "test--tiny-llama")
    data = write_jsonl(home / "chat.jsonl", chat_rows(8))
    spec = home / "job.yaml"
    spec.write_text(f"name: snippet\nbase_model: test--tiny-llama\ndataset: {data}\n"
                    "hyperparameters: {max_steps: 2, precision: fp32}\ngpu_config: {num_gpus: 0}\n")
    result = subprocess.run([sys.executable, "-m", "usf_bios", "train", str(spec), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=600, cwd=home)
    assert result.returncode == 0, result.stderr
    [job_dir] = (home / ".usf-bios" / "data" / "output").iterdir()
    return env, job_dir.name


@pytest.mark.parametrize("where, code", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_snippet_runs_as_pasted(trained, where, code):
    env, job_id = trained
    result = subprocess.run([sys.executable, "-c", code.replace("JOB_ID", job_id)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=env["HOME"])
    assert result.returncode == 0, f"{where}:\n{code}\n{result.stderr[-3000:]}"
