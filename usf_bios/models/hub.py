"""Models from the Hugging Face Hub on demand: ``usf-bios models pull org/name`` and the models page's Download.

``huggingface_hub.snapshot_download`` fetches into the hub cache (``$HF_HOME/hub``, the cache the resolver reads),
resumable (a second pull continues the partial files and skips the finished ones), with ``HF_TOKEN`` for gated
or private models and ``HF_ENDPOINT`` for a mirror. Only what training needs is fetched: the top-level config,
tokenizer and chat-template files and the weights — ``*.safetensors`` when the repository has them (without a
``consolidated*`` original-format copy beside the shards), else PyTorch ``*.bin`` — never ONNX, GGUF, TensorFlow
or Flax weights or subfolders such as ``original/``. The result is
checked like any model folder. Everything else in USF BIOS stays offline: only a pull reaches the Hub.

``python -m usf_bios.models.hub REPO_ID [REVISION]`` is the pull the server runs as its own process: one JSON
line with the files and their total size, then one with the snapshot folder or the error.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usf_bios.models.validate import ModelFolderError, check_model_folder

KEEP_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")   # config, tokenizer, template, code


class PullError(RuntimeError):
    """A pull that cannot be done; the message says why (not found, gated, unreachable, not a model)."""


@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    files: dict[str, int]    # file → bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def choose_files(files: dict[str, int]) -> dict[str, int]:
    """The files a pull fetches, of the repository's (path → size)."""
    top = {path: size for path, size in files.items() if "/" not in path}
    weights = {p: s for p, s in top.items() if p.endswith(".safetensors")}
    if any(not p.startswith("consolidated") for p in weights):   # Mistral's original-format copy beside the shards
        weights = {p: s for p, s in weights.items() if not p.startswith("consolidated")}
    if not weights:
        weights = {p: s for p, s in top.items() if p.endswith(".bin") and "pytorch_model" in p}
    index = "model.safetensors.index.json" if any(p.endswith(".safetensors") for p in weights) else "pytorch_model.bin.index.json"
    keep = {p: s for p, s in top.items() if p.endswith(KEEP_SUFFIXES) and not p.endswith(".index.json")}
    if index in top:
        keep[index] = top[index]
    return {**keep, **weights}


def allow_online() -> None:
    """A pull is the one deliberate network use: lift HF_HUB_OFFLINE for it (set for the engine and the tests)."""
    os.environ["HF_HUB_OFFLINE"] = "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = False  # type: ignore[attr-defined]


def endpoint() -> str:
    """The Hub's address: HF_ENDPOINT (a mirror, or the tests' local hub) read now, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _translate(err: Exception, repo_id: str, revision: str) -> PullError:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = endpoint()
    if isinstance(err, GatedRepoError):
        return PullError(f"{repo_id} is gated on {where}: accept its terms there and set HF_TOKEN")
    if isinstance(err, RepositoryNotFoundError):
        return PullError(f"{repo_id} was not found on {where} (a private repository needs HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return PullError(f"{repo_id} has no revision {revision!r} on {where}")
    if isinstance(err, HfHubHTTPError):
        return PullError(f"{where} refused the download of {repo_id}: {err}")
    return PullError(f"cannot reach {where} for {repo_id}: {type(err).__name__}: {err}")


def plan_pull(repo_id: str, revision: str = "main", token: str | None = None) -> PullPlan:
    """What a pull of ``repo_id`` at ``revision`` fetches (asks the Hub for the file list and sizes)."""
    allow_online()
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint(), token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as err:  # the Hub's errors, and the HTTP client's
        raise _translate(err, repo_id, revision) from None
    files = choose_files({s.rfilename: s.size or 0 for s in info.siblings or []})
    if not any(p.endswith((".safetensors", ".bin")) for p in files) or "config.json" not in files:
        raise PullError(f"{repo_id} at {revision} has no config.json with *.safetensors or pytorch_model*.bin weights "
                        "at its top level: not a model USF BIOS can train")
    return PullPlan(repo_id, revision, info.sha or revision, files)


def pull_model(plan: PullPlan, cache_dir: Path, token: str | None = None, progress: Any = None) -> Path:
    """Fetch the plan's files into the hub cache and return the snapshot folder, checked as a model folder.
    ``progress``: a tqdm class for the byte counts (the CLI's bar); hub's own bars otherwise."""
    allow_online()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(plan.repo_id, revision=plan.revision, cache_dir=str(cache_dir),
                                        allow_patterns=sorted(plan.files), token=token, tqdm_class=progress,
                                        endpoint=endpoint()))
    except Exception as err:
        raise _translate(err, plan.repo_id, plan.revision) from None
    try:
        check_model_folder(folder)
    except ModelFolderError as err:
        raise PullError(f"{plan.repo_id} downloaded, but it is not a usable model folder: {'; '.join(err.problems)}") from None
    return folder


def cache_bytes(cache_dir: Path, repo_id: str) -> int:
    """Bytes of ``repo_id`` in the hub cache so far, partial downloads included (a pull's progress)."""
    blobs = cache_dir / f"models--{repo_id.replace('/', '--')}" / "blobs"
    try:
        return sum(p.stat().st_size for p in blobs.iterdir() if p.is_file())
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    from usf_bios.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m usf_bios.models.hub REPO_ID [REVISION]", file=sys.stderr)
        return 2
    token = os.environ.get("HF_TOKEN") or None
    settings = get_settings()
    try:
        plan = plan_pull(args[0], args[1] if len(args) == 2 else "main", token)
        print(json.dumps({"files": plan.files, "total_bytes": plan.total_bytes, "commit": plan.commit}), flush=True)
        folder = pull_model(plan, Path(str(settings.transformers_cache)), token)
    except PullError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    print(json.dumps({"path": str(folder)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
