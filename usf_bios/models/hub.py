"""Models from a hub on demand: ``usf-bios models pull [--source S] org/name`` and the models page's Download.

One pull flow, two sources. ``huggingface``: ``huggingface_hub.snapshot_download`` into the hub cache
(``$HF_HOME/hub``), ``HF_TOKEN`` for gated or private models, ``HF_ENDPOINT`` for a mirror. ``modelscope`` (the
optional extra ``usf-bios[modelscope]``): the ModelScope SDK's ``snapshot_download`` into ``MODELSCOPE_CACHE``
(``{cache}/models/{org}--{name}/snapshots/{revision}``), ``MODELSCOPE_API_TOKEN`` for private models,
``MODELSCOPE_ENDPOINT`` (or the older ``MODELSCOPE_DOMAIN``) for another site. Both are resumable: a second pull
skips the finished files and continues the partial ones.

Only what training needs is fetched: the top-level config, tokenizer and chat-template files and the weights —
``*.safetensors`` when the repository has them (without a ``consolidated*`` original-format copy beside the
shards), else PyTorch ``*.bin`` — never ONNX, GGUF, TensorFlow or Flax weights or subfolders such as
``original/``. The result is checked like any model folder. Everything else in USF BIOS stays offline: only a pull
reaches a hub.

``python -m usf_bios.models.hub [--source S] REPO_ID [REVISION]`` is the pull the server runs as its own process:
one JSON line with the files and their total size, then one with the snapshot folder or the error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usf_bios.models.validate import ModelFolderError, check_model_folder
from usf_bios.storage import StorageLayout

KEEP_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")   # config, tokenizer, template, code
SOURCES = ("huggingface", "modelscope")
LABELS = {"huggingface": "the Hugging Face Hub", "modelscope": "ModelScope"}
DEFAULT_REVISIONS = {"huggingface": "main", "modelscope": "master"}
TOKEN_VARIABLES = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}
SDKS = {"huggingface": "huggingface_hub", "modelscope": "modelscope"}


class PullError(RuntimeError):
    """A pull that cannot be done; the message says why (not found, gated, unreachable, not a model)."""


@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    files: dict[str, int]    # file → bytes
    source: str = "huggingface"

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


def refusal(source: str, enabled: tuple[str, ...]) -> str | None:
    """Why pulls from ``source`` are off here (not in SUPPORTED_MODEL_SOURCES, or its SDK not installed), or None."""
    if source not in SOURCES:
        return f"{source!r} is not a hub: pull from {' or '.join(SOURCES)}"
    if source not in enabled:
        return f"{source} is not in SUPPORTED_MODEL_SOURCES ({','.join(enabled)})"
    if importlib.util.find_spec(SDKS[source]) is None:
        return f"the {source} SDK is not installed (pip install 'usf-bios[{source}]')"
    return None


def default_revision(source: str) -> str:
    """The branch a pull takes without --revision: main on the Hugging Face Hub, master on ModelScope."""
    return DEFAULT_REVISIONS[source]


def token(source: str) -> str | None:
    """The source's token from the environment (HF_TOKEN, MODELSCOPE_API_TOKEN), read now."""
    return os.environ.get(TOKEN_VARIABLES[source]) or None


def cache_dir(source: str, layout: StorageLayout) -> Path:
    """Where a pull from ``source`` puts the model: the cache the resolver reads for that source."""
    return layout.modelscope_cache if source == "modelscope" else layout.hf_hub_cache


def allow_online() -> None:
    """A pull is the one deliberate network use: lift HF_HUB_OFFLINE for it (set for the engine and the tests)."""
    os.environ["HF_HUB_OFFLINE"] = "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = False  # type: ignore[attr-defined]


def endpoint(source: str = "huggingface") -> str:
    """The hub's address, read now: HF_ENDPOINT else huggingface.co; MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN
    (a host name, https assumed), else modelscope.cn."""
    if source == "modelscope":
        domain = os.environ.get("MODELSCOPE_DOMAIN", "").strip()
        if domain and not domain.startswith(("http://", "https://")):
            domain = f"https://{domain}"
        return (os.environ.get("MODELSCOPE_ENDPOINT") or domain or "https://modelscope.cn").rstrip("/")
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _translate_hf(err: Exception, repo_id: str, revision: str) -> PullError:
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


def _translate_ms(err: Exception, repo_id: str, revision: str, *, missing: str = "repository") -> PullError:
    """``missing``: what a 404 means here (the repository, or its revision once the repository answered)."""
    from modelscope_hub.errors import APIError, AuthenticationError, NotExistError, PermissionDeniedError

    where = endpoint("modelscope")
    cause = err.__cause__ if isinstance(err.__cause__, APIError) else err   # snapshot_download wraps them
    if isinstance(cause, NotExistError):
        if missing == "revision":
            return PullError(f"{repo_id} has no revision {revision!r} on {where}")
        return PullError(f"{repo_id} was not found on {where} (a private repository needs MODELSCOPE_API_TOKEN)")
    if isinstance(cause, (AuthenticationError, PermissionDeniedError)):
        return PullError(f"{repo_id} is private or restricted on {where}: set MODELSCOPE_API_TOKEN to a token "
                         "that may read it")
    if isinstance(cause, APIError):
        return PullError(f"{where} refused the download of {repo_id}: {getattr(cause, 'message', cause)}")
    return PullError(f"cannot reach {where} for {repo_id}: {type(cause).__name__}: {str(cause).splitlines()[0]}")


def _modelscope_direct() -> None:
    """No intra-cloud acceleration: its probe would fetch an address the hub's answer names (an internal region
    service) before each download; a pull talks to the configured endpoint only."""
    os.environ["MODELSCOPE_DOWNLOAD_INTRA_CLOUD"] = "false"


def _hf_listing(repo_id: str, revision: str, token: str | None) -> tuple[dict[str, int], str]:
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint(), token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as err:  # the Hub's errors, and the HTTP client's
        raise _translate_hf(err, repo_id, revision) from None
    return {s.rfilename: s.size or 0 for s in info.siblings or []}, info.sha or revision


def _ms_listing(repo_id: str, revision: str, token: str | None) -> tuple[dict[str, int], str]:
    _modelscope_direct()
    from modelscope.hub.api import HubApi
    from modelscope_hub.errors import NotExistError

    api = HubApi(endpoint=endpoint("modelscope"), token=token)
    try:
        files = api.get_model_files(repo_id, revision=revision, recursive=True)
    except NotExistError as err:   # no such repository, or no such revision of it
        try:
            api.get_model(repo_id)
        except Exception as missing:
            raise _translate_ms(missing, repo_id, revision) from None
        raise _translate_ms(err, repo_id, revision, missing="revision") from None
    except Exception as err:
        raise _translate_ms(err, repo_id, revision) from None
    return {str(f["Path"]): int(f.get("Size") or 0) for f in files}, revision


def plan_pull(repo_id: str, revision: str | None = None, token: str | None = None,
              source: str = "huggingface") -> PullPlan:
    """What a pull of ``repo_id`` at ``revision`` (the source's default branch when None) fetches: asks the hub for
    the file list and sizes."""
    allow_online()
    revision = revision or default_revision(source)
    listing = _ms_listing if source == "modelscope" else _hf_listing
    everything, commit = listing(repo_id, revision, token)
    files = choose_files(everything)
    if not any(p.endswith((".safetensors", ".bin")) for p in files) or "config.json" not in files:
        raise PullError(f"{repo_id} at {revision} has no config.json with *.safetensors or pytorch_model*.bin weights "
                        "at its top level: not a model USF BIOS can train")
    return PullPlan(repo_id, revision, commit, files, source)


def _hf_download(plan: PullPlan, cache: Path, token: str | None, progress: Any) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(plan.repo_id, revision=plan.revision, cache_dir=str(cache),
                                      allow_patterns=sorted(plan.files), token=token, tqdm_class=progress,
                                      endpoint=endpoint()))
    except Exception as err:
        raise _translate_hf(err, plan.repo_id, plan.revision) from None


def _ms_download(plan: PullPlan, cache: Path, token: str | None, progress: Any) -> Path:
    _modelscope_direct()
    from modelscope.hub.snapshot_download import snapshot_download

    try:
        return Path(snapshot_download(plan.repo_id, revision=plan.revision, cache_dir=str(cache),
                                      allow_patterns=sorted(plan.files), token=token, endpoint=endpoint("modelscope"),
                                      progress_callbacks=progress))
    except Exception as err:
        raise _translate_ms(err, plan.repo_id, plan.revision) from None


def pull_model(plan: PullPlan, cache: Path, token: str | None = None, progress: Any = None) -> Path:
    """Fetch the plan's files into the source's cache and return the snapshot folder, checked as a model folder.
    ``progress``: a tqdm class (Hugging Face) or a list of ProgressCallback classes (ModelScope) for the byte
    counts; the SDK's own bars otherwise."""
    allow_online()
    download = _ms_download if plan.source == "modelscope" else _hf_download
    folder = download(plan, cache, token, progress)
    try:
        check_model_folder(folder)
    except ModelFolderError as err:
        raise PullError(f"{plan.repo_id} downloaded, but it is not a usable model folder: {'; '.join(err.problems)}") from None
    return folder


def cache_bytes(cache: Path, repo_id: str, source: str = "huggingface") -> int:
    """Bytes of ``repo_id`` in the source's cache so far, partial downloads included (a pull's progress)."""
    if source == "modelscope":
        org, _, name = repo_id.partition("/")
        folders = [cache / "models" / f"{org}--{name}", cache / "models" / org / name.replace(".", "___")]
    else:
        folders = [cache / f"models--{repo_id.replace('/', '--')}" / "blobs"]
    try:
        return sum(p.stat().st_size for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file())
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    from usf_bios.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    source = "huggingface"
    if args[:1] == ["--source"] and len(args) > 1:
        source, args = args[1], args[2:]
    if not 1 <= len(args) <= 2 or source not in SOURCES:
        print("usage: python -m usf_bios.models.hub [--source huggingface|modelscope] REPO_ID [REVISION]",
              file=sys.stderr)
        return 2
    secret = token(source)
    try:
        plan = plan_pull(args[0], args[1] if len(args) == 2 else None, secret, source)
        print(json.dumps({"files": plan.files, "total_bytes": plan.total_bytes, "commit": plan.commit}), flush=True)
        folder = pull_model(plan, cache_dir(source, StorageLayout.from_settings(get_settings())), secret)
    except PullError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    print(json.dumps({"path": str(folder)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
