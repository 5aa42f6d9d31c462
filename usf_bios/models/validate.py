"""Check a model folder before anything loads it, and say exactly what is missing."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; ``problems`` lists each missing piece."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"model folder {folder} is not usable:\n" + "\n".join(f"  - {p}" for p in problems))


def _shards_missing(folder: Path, index_name: str) -> list[str]:
    index = folder / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{index_name} is not valid JSON ({err})"]
    return [f"shard {name} listed in {index_name} is missing" for name in sorted(set(weight_map.values()))
            if not (folder / name).is_file()]


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pytorch .bin files) directly in the folder."""
    return sorted(folder.glob("*.safetensors")), sorted(folder.glob("*.bin"))


def check_model_folder(folder: Path) -> dict:
    """Validate a folder of a Hugging Face-style causal LM; return its parsed config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(folder, ["the folder does not exist"])
    problems: list[str] = []
    config: dict = {}
    config_file = folder / "config.json"
    if not config_file.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if not isinstance(config, dict) or "model_type" not in config:
                problems.append("config.json has no model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"config.json is not valid JSON ({err})")
    safetensors, bins = weight_files(folder)
    if not safetensors and not bins:
        problems.append("no weights: expected *.safetensors (or *.bin, loaded with weights_only)")
    problems += _shards_missing(folder, "model.safetensors.index.json")
    problems += _shards_missing(folder, "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append("no tokenizer files: expected tokenizer.json, tokenizer.model or vocab.json (+ tokenizer_config.json)")
    elif (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file() and not (folder / "merges.txt").is_file():
        problems.append("vocab.json without merges.txt: the BPE tokenizer is incomplete")
    if problems:
        raise ModelFolderError(folder, problems)
    return config
