"""A disk that fills up: the job fails with a clear reason, the older checkpoints stay, nothing partial is left.

The checkpoints go to a real tmpfs of a few MB (mounting needs root; the tests skip elsewhere).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import chat_rows, event_dicts, write_jsonl
from usf_bios.engine import checkpoint as ckpt
from usf_bios.engine.checkpoint import HEADROOM_BYTES, list_checkpoints, read_state
from usf_bios.engine.jobdir import create_job
from usf_bios.engine.run import run_job
from usf_bios.settings import get_settings
from usf_bios.spec import parse_spec
from usf_bios.storage import StorageLayout


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) → a fresh tmpfs of ``size`` bytes; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def spec(model: str, dataset: Path, name: str, **hp) -> dict:
    hyper = dict(max_steps=8, learning_rate=3e-3, batch_size=2, gradient_accumulation_steps=1, max_seq_length=128,
                 lora_r=64, lora_alpha=128, lora_dropout=0.0, val_split=0.0, save_steps=2, save_total_limit=3,
                 precision="fp32", gradient_checkpointing=False)
    hyper.update(hp)
    return {"name": name, "base_model": model, "dataset": str(dataset), "hyperparameters": hyper,
            "gpu_config": {"num_gpus": 0}}


def checkpoint_size(layout: StorageLayout, model: str, dataset: Path) -> int:
    """Bytes of one checkpoint of this job shape, from a short run on the ordinary disk."""
    job = create_job(parse_spec(spec(model, dataset, "measure", max_steps=3)), layout)
    assert run_job(job, layout).status == "completed"
    (only,) = list_checkpoints(layout.job_checkpoints(job))
    return sum(f.stat().st_size for f in only.iterdir())


def checkpoints_on(disk: Path, monkeypatch: pytest.MonkeyPatch) -> StorageLayout:
    monkeypatch.setenv("CHECKPOINT_PATH", str(disk))
    get_settings.cache_clear()
    return StorageLayout.from_settings(get_settings())


def assert_whole(checkpoint: Path, step: int) -> None:
    assert read_state(checkpoint).step == step
    assert load_file(checkpoint / "adapter_model.safetensors")
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]


def test_a_save_that_would_not_fit_is_refused_before_writing_and_the_job_resumes_once_there_is_room(
        layout, tiny_model, tmp_path, small_disk, monkeypatch):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    size = checkpoint_size(layout, tiny_model, dataset)
    assert size > 500_000  # rank 64: large enough that tmpfs's page rounding does not matter
    # room for two checkpoints and the headroom, not for a third
    disk = small_disk(2 * size + HEADROOM_BYTES + size // 2)
    on_disk = checkpoints_on(disk, monkeypatch)
    job = create_job(parse_spec(spec(tiny_model, dataset, "full-disk")), on_disk)

    result = run_job(job, on_disk)

    assert result.status == "failed"
    folder = on_disk.job_checkpoints(job)
    assert result.error.startswith(f"no space left on device: checkpoint 6 needs ~{size / 1e6:.1f} MB, ")
    assert result.error.endswith(f" MB free on {folder}")
    assert event_dicts(on_disk.job_events(job))[-1]["error"] == result.error
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no .tmp
    assert_whole(folder / "checkpoint-4", 4)

    subprocess.run(["mount", "-o", f"remount,size={8 * size + HEADROOM_BYTES}", str(disk)], check=True)
    resumed = run_job(job, on_disk)
    assert resumed.status == "completed", resumed.error
    metrics = [e["step"] for e in event_dicts(on_disk.job_events(job)) if e["type"] == "metric"]
    assert metrics[-4:] == [5, 6, 7, 8]  # continued from checkpoint-4


def test_a_disk_that_fills_during_the_write_leaves_no_partial_folder_and_keeps_the_last_checkpoint(
        layout, tiny_model, tmp_path, small_disk, monkeypatch):
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    size = checkpoint_size(layout, tiny_model, dataset)
    disk = small_disk(size + size // 2)  # one checkpoint fits; the second runs out of space while it is written
    on_disk = checkpoints_on(disk, monkeypatch)
    # the check sees plenty of room, as when another writer fills the disk between the check and the write
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 10**12)
    job = create_job(parse_spec(spec(tiny_model, dataset, "filling-disk")), on_disk)

    result = run_job(job, on_disk)

    assert result.status == "failed"
    folder = on_disk.job_checkpoints(job)
    assert result.error.startswith(f"no space left on device while writing checkpoint 4: it needs ~{size / 1e6:.1f} MB")
    assert result.error.endswith("once the partial checkpoint was removed; checkpoint-2 is kept")
    assert "inline_container" not in result.error
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2"]
    assert_whole(folder / "checkpoint-2", 2)
    assert sum(f.stat().st_size for f in disk.rglob("*") if f.is_file()) == size  # the partial write is gone
