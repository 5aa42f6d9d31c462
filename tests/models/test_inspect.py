"""Parameter count from safetensors headers only, and folder size through HF cache symlinks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from usf_bios.models.inspect import folder_size, parameter_count


def write_safetensors(file: Path, shapes: dict[str, list[int]], metadata: dict | None = None) -> Path:
    """A real safetensors file of float32 zeros, written by hand (header + data)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return file


def test_parameter_count_matches_the_loaded_model(tiny_model_template):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_template)
    expected = sum(p.numel() for p in model.parameters())
    assert expected > 10_000
    assert parameter_count(tiny_model_template) == expected


def test_parameter_count_reads_only_headers(tmp_path):
    """A file whose data is cut off after the header still counts: nothing past the header is read."""
    folder = tmp_path / "cut"
    folder.mkdir()
    file = write_safetensors(folder / "model.safetensors", {"w": [1000, 1000]})
    (length,) = struct.unpack("<Q", file.read_bytes()[:8])
    file.write_bytes(file.read_bytes()[: 8 + length])
    assert parameter_count(folder) == 1_000_000


def test_sharded_pair_counts_each_listed_shard_once(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": [4, 8], "a.bias": [8]})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.weight": [3, 5, 7], "scale": []})
    index = {"metadata": {"total_size": 0}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                           "a.bias": "model-00001-of-00002.safetensors",
                                                           "b.weight": "model-00002-of-00002.safetensors",
                                                           "scale": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = 4 * 8 + 8 + 3 * 5 * 7 + 1
    assert parameter_count(tmp_path) == expected
    # a stray consolidated file next to the shards is not what the index names: not counted
    write_safetensors(tmp_path / "consolidated.safetensors", {"x": [100]})
    assert parameter_count(tmp_path) == expected


def test_sharded_without_index_sums_every_file(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": [2, 3]})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": [5]})
    assert parameter_count(tmp_path) == 11


def test_parameter_count_none_without_readable_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 64)
    assert parameter_count(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert parameter_count(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{}")  # truncated header
    assert parameter_count(tmp_path) is None


def test_folder_size_plain_and_through_hf_snapshot_links(tmp_path, tiny_model_template):
    files = sorted(p for p in tiny_model_template.iterdir() if p.is_file())
    expected = sum(p.stat().st_size for p in files)
    assert folder_size(tiny_model_template) == expected

    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(files):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        os.symlink(Path("..", "..", "blobs", blob.name), snapshot / file.name)
    assert all((snapshot / f.name).is_symlink() for f in files)
    assert folder_size(snapshot) == expected          # the blobs' bytes, not the links' length
    os.symlink(snapshot / files[0].name, snapshot / "again")
    assert folder_size(snapshot) == expected          # two links to one blob count it once
    os.symlink(tmp_path / "missing", snapshot / "broken")
    assert folder_size(snapshot) == expected
