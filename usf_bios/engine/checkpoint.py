"""Checkpoints: adapter, optimizer, scheduler, RNG states and where the run stood.

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during
a save leaves the previous checkpoint whole; ``trainer_state.json`` is written last.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where checkpoints are written or read, not where they are listed
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where the run stands: enough to continue exactly."""

    step: int = 0                # optimizer steps done
    epoch: int = 0               # current epoch (0-based)
    micro_batch: int = 0         # next micro-batch within the epoch
    samples_seen: int = 0        # training rows consumed
    tokens_seen: int = 0         # non-padding tokens consumed
    total_steps: int = 0
    data_sha256: str = ""
    spec_fingerprint: str = ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainerState, keep: int) -> Path:
    """Write ``folder/checkpoint-{step}`` atomically and prune to the newest ``keep``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{state.step}"
    tmp = folder / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors (peft writes only the adapter)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    for file in tmp.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a step redone after a resume: the new one replaces it
        trash = folder / f".checkpoint-{state.step}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without trainer_state.json is not complete)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def restore_checkpoint(checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Load adapter weights, optimizer, scheduler and RNG states; call after the model is built."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(checkpoint / ADAPTER_WEIGHTS, device=str(device)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{checkpoint} does not match this model's adapter: unexpected {unexpected[:3]}")
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=True))
    return read_state(checkpoint)


def clean_partial(folder: Path) -> None:
    """Remove temporary folders left by a save that was killed."""
    if folder.is_dir():
        for leftover in folder.glob(".checkpoint-*"):
            shutil.rmtree(leftover, ignore_errors=True)
