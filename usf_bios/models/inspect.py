"""Facts about a model folder read without loading it: parameter count (safetensors headers) and size on disk."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger length means the file is not safetensors


def safetensors_header(file: Path) -> dict:
    """The JSON header of one .safetensors file: 8-byte little-endian length, then that many bytes of JSON."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file.name}: too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{file.name}: header length {length} is not plausible")
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError(f"{file.name}: header is truncated")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}: header is not a JSON object")
    return header


def _weight_files(folder: Path) -> list[Path]:
    """The shards named by the index when there is one (so stray extra files are not counted twice), else every file."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int | None:
    """Sum of the tensors' element counts from the safetensors headers; None without readable safetensors."""
    files = _weight_files(Path(folder))
    if not files:
        return None
    total = 0
    try:
        for file in files:
            for name, tensor in safetensors_header(file).items():
                if name != "__metadata__":
                    total += math.prod(int(d) for d in tensor["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return total


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``; a file symlink (HF snapshot → blob) counts the file it points to, once.

    Symlinked folders are not descended into, and broken links count nothing.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            try:
                stat = os.stat(os.path.join(parent, name))  # follows the link
            except OSError:
                continue
            key = (stat.st_dev, stat.st_ino)
            if key not in seen:
                seen.add(key)
                total += stat.st_size
    return total
