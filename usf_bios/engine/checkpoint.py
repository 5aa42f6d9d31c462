"""Checkpoints: adapter, optimizer, scheduler, RNG states and where the run stood.

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during
a save leaves the previous checkpoint whole; ``trainer_state.json`` is written last.

Before each save the free space on the checkpoint folder's disk is checked against what the checkpoint
needs (the size of the newest checkpoint, or for the first one the adapter and optimizer tensors); too
little raises CheckpointSpaceError before a byte is written. A write that fails anyway (the disk filled
meanwhile) removes the partial folder at once and raises the same error; older checkpoints stay.
"""

from __future__ import annotations

import errno
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
HEADROOM_BYTES = 1 << 20        # left free beyond the estimate (+5%): logs and metadata still need a little
_SMALL_FILES_BYTES = 64 << 10   # scheduler and RNG states, JSON files: an allowance in the first estimate
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SPACE_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class CheckpointSpaceError(RuntimeError):
    """Not enough free disk for a checkpoint: found before writing, or when a write failed for lack of space."""

    def __init__(self, message: str, *, step: int, needed: int, free: int, folder: Path):
        super().__init__(message)
        self.step, self.needed, self.free, self.folder = step, needed, free, folder


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write on ``folder``'s filesystem (tests replace it to simulate a disk that
    fills between the check and the write)."""
    return shutil.disk_usage(folder).free


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:,.0f} MB"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes_needed(folder: Path, model: Any, optimizer: Any) -> int:
    """What the next checkpoint will take: the newest one's size, else the trainable tensors and Adam's state."""
    newest = latest_checkpoint(folder)
    if newest is not None:
        return _folder_bytes(newest)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                  if hasattr(t, "numel"))
    return weights + (moments or 2 * weights) + _SMALL_FILES_BYTES


def _out_of_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk: an OSError ENOSPC/EDQUOT anywhere in the chain (torch wraps it in
    '[enforce fail at inline_container.cc] unexpected pos', safetensors in its own error naming os error 28)."""
    seen: BaseException | None = err
    for _ in range(16):  # a chain is short; the bound guards against a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRNOS:
            return True
        if any(text in str(seen) for text in _SPACE_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _save_tensor_file(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a failed write keeps its OSError (as the RuntimeError's context)."""
    import torch

    with path.open("wb") as handle:
        torch.save(obj, handle)


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
    world_size: int = 1          # ranks the job ran on: the data order per step depends on it
    strategy: str = ""           # 'fsdp' when saved under FSDP2 (its optimizer state is keyed by parameter name)


@dataclass(frozen=True)
class SavedTraining:
    """What FSDP2's ranks gathered onto rank 0 for a checkpoint: the adapter's full tensors and the optimizer's
    full state (``engine/fsdp.py``); without it the model and optimizer are whole in this process."""

    adapter: dict[str, Any]
    optimizer: dict[str, Any]


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
                    state: TrainerState, keep: int, gathered: SavedTraining | None = None) -> Path:
    """Write ``folder/checkpoint-{step}`` atomically and prune to the newest ``keep``; under FSDP2 the adapter and
    the optimizer state are those ``gathered`` onto this rank.

    Raises CheckpointSpaceError, with nothing of this checkpoint left on disk, when the disk lacks the room.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{state.step}"
    tmp = folder / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    needed, free = checkpoint_bytes_needed(folder, model, optimizer), free_bytes(folder)
    if free < needed + needed // 20 + HEADROOM_BYTES:
        raise CheckpointSpaceError(f"no space left on device: checkpoint {state.step} needs ~{_mb(needed)}, "
                                   f"{_mb(free)} free on {folder}", step=state.step, needed=needed, free=free,
                                   folder=folder)
    try:
        tmp.mkdir()
        # adapter_config.json + adapter_model.safetensors (peft writes only the adapter)
        model.save_pretrained(tmp, **({"state_dict": gathered.adapter} if gathered else {}))
        _save_tensor_file(gathered.optimizer if gathered else optimizer.state_dict(), tmp / "optimizer.pt")
        _save_tensor_file(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_tensor_file(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        for file in tmp.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    except BaseException as err:  # nothing partial stays behind, whatever stopped the write
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception) or not _out_of_space(err):
            raise
        free = free_bytes(folder)
        previous = latest_checkpoint(folder)
        raise CheckpointSpaceError(
            f"no space left on device while writing checkpoint {state.step}: it needs ~{_mb(needed)}, "
            f"{_mb(free)} free on {folder} once the partial checkpoint was removed"
            + (f"; {previous.name} is kept" if previous else ""),
            step=state.step, needed=needed, free=free, folder=folder) from err
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


def restore_adapter(checkpoint: Path, model: Any) -> None:
    """Load the checkpoint's adapter weights into the (unsharded) model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(checkpoint / ADAPTER_WEIGHTS, device=str(device)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{checkpoint} does not match this model's adapter: unexpected {unexpected[:3]}")


def restore_checkpoint(checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                       sharded: bool = False) -> TrainerState:
    """Load adapter weights, optimizer, scheduler and RNG states; call after the model is built. ``sharded``
    (FSDP2): the adapter was restored before sharding (``restore_adapter``) and the saved full optimizer state is
    sharded onto this rank's parameters."""
    import torch

    if sharded:
        from usf_bios.engine.fsdp import load_optimizer

        load_optimizer(model, optimizer, torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    else:
        restore_adapter(checkpoint, model)
        device = next(p.device for p in model.parameters() if p.requires_grad)
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=True))
    return read_state(checkpoint)


def clean_partial(folder: Path) -> None:
    """Remove temporary folders left by a save that was killed."""
    if folder.is_dir():
        for leftover in folder.glob(".checkpoint-*"):
            shutil.rmtree(leftover, ignore_errors=True)
