"""Where every file lives. All paths derive from the settings; nothing else builds them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from usf_bios.settings import Settings


class PathOutsideRoot(ValueError):
    """A user-supplied name would leave the folder it must stay in."""


def confine(root: Path, name: str | Path) -> Path:
    """Resolve ``name`` inside ``root``; refuse anything that escapes it (``..``, absolute, symlinks)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / name).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise PathOutsideRoot(f"{str(name)!r} is outside {root_resolved}")
    return candidate


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(raw: str, max_length: int = 200) -> str:
    """The basename of an untrusted filename, with only [A-Za-z0-9._-] and no leading dots."""
    base = PurePosixPath(raw.replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    if len(cleaned) > max_length:
        stem, dot, suffix = cleaned.rpartition(".")
        cleaned = stem[: max_length - len(suffix) - 1] + dot + suffix if dot and len(suffix) < 16 else cleaned[:max_length]
    return cleaned


@dataclass(frozen=True)
class StorageLayout:
    """The storage root and the folders of ARCHITECTURE's 'Files of a job'."""

    root: Path
    output: Path
    checkpoints: Path
    logs: Path
    models: Path
    hf_home: Path
    hf_hub_cache: Path
    modelscope_cache: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> "StorageLayout":
        assert settings.output_path and settings.checkpoint_path and settings.log_path and settings.model_path
        assert settings.hf_home and settings.transformers_cache and settings.modelscope_cache
        return cls(
            root=settings.usf_home,
            output=settings.output_path,
            checkpoints=settings.checkpoint_path,
            logs=settings.log_path,
            models=settings.model_path,
            hf_home=settings.hf_home,
            hf_hub_cache=settings.transformers_cache,
            modelscope_cache=settings.modelscope_cache,
        )

    @property
    def uploads(self) -> Path:
        return self.root / "data" / "uploads"

    @property
    def datasets(self) -> Path:
        return self.root / "data" / "datasets"

    def job_output(self, job_id: str) -> Path:
        return confine(self.output, job_id)

    def job_checkpoints(self, job_id: str) -> Path:
        return confine(self.checkpoints, job_id)

    def job_log(self, job_id: str) -> Path:
        return confine(self.logs, f"{job_id}.log")

    def job_events(self, job_id: str) -> Path:
        return confine(self.logs, f"{job_id}.events.jsonl")

    def job_spec(self, job_id: str) -> Path:
        return self.job_output(job_id) / "job.yaml"

    def ensure(self) -> None:
        for folder in (self.output, self.checkpoints, self.logs, self.models, self.uploads, self.datasets):
            folder.mkdir(parents=True, exist_ok=True)
