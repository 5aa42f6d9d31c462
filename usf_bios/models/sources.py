"""Find a base model on disk, offline: a folder path, a name under USF_MODEL_PATH, or a cache entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from usf_bios.storage import PathOutsideRoot, StorageLayout, confine


class ModelNotFound(LookupError):
    """No source holds the model; the message lists where it looked."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str      # what the spec said
    path: Path     # the folder with config.json, weights and tokenizer
    source: str    # local | huggingface | modelscope


def registry_name(repo_id: str) -> str:
    """'org/name' → 'org--name', the folder name under USF_MODEL_PATH."""
    return repo_id.strip("/").replace("/", "--")


def huggingface_snapshot(hub_cache: Path, repo_id: str) -> Path | None:
    """The snapshot folder of ``org/name`` in a Hugging Face hub cache (refs/main first, else the newest)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    folders = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return folders[-1] if folders else None


def modelscope_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot folder of ``org/name`` in the ModelScope SDK's cache layout since 1.38,
    ``{cache}/models/{org}--{name}/snapshots/{revision}`` (master first, else the newest with a config.json)."""
    snapshots = cache / "models" / repo_id.replace("/", "--", 1) / "snapshots"
    if not snapshots.is_dir():
        return None
    if (snapshots / "master" / "config.json").is_file():
        return snapshots / "master"
    folders = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return folders[-1] if folders else None


def modelscope_folder(cache: Path, repo_id: str) -> Path | None:
    """``org/name`` in a ModelScope cache: the snapshot layout (what ``models pull --source modelscope`` writes),
    else the older SDKs' ``models/{org}/{name}`` layouts (a '.' in the name spelled '___')."""
    snapshot = modelscope_snapshot(cache, repo_id)
    if snapshot is not None:
        return snapshot
    org, _, name = repo_id.partition("/")
    for base in (cache / "models", cache / "hub" / "models", cache, cache / "hub"):
        for spelled in (name, name.replace(".", "___")):
            candidate = base / org / spelled
            if (candidate / "config.json").is_file():
                return candidate
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()


def resolve_model(name: str, layout: StorageLayout, sources: tuple[str, ...]) -> ResolvedModel:
    """Resolve the spec's ``base_model`` to a folder without touching the network."""
    looked: list[str] = []
    if _looks_like_path(name):
        path = Path(name).expanduser().resolve()
        if path.is_dir():
            return ResolvedModel(name, path, "local")
        raise ModelNotFound(f"model folder {path} does not exist")
    if "local" in sources:
        for candidate_name in dict.fromkeys((name, registry_name(name))):
            try:
                candidate = confine(layout.models, candidate_name)
            except PathOutsideRoot:
                continue
            looked.append(str(candidate))
            if candidate.is_dir():
                return ResolvedModel(name, candidate, "local")
    repo_id = name.replace("--", "/", 1) if "/" not in name and "--" in name else name
    if "/" in repo_id:
        if "huggingface" in sources:
            looked.append(f"Hugging Face cache {layout.hf_hub_cache}")
            snapshot = huggingface_snapshot(layout.hf_hub_cache, repo_id)
            if snapshot is not None:
                return ResolvedModel(name, snapshot, "huggingface")
        if "modelscope" in sources:
            looked.append(f"ModelScope cache {layout.modelscope_cache}")
            folder = modelscope_folder(layout.modelscope_cache, repo_id)
            if folder is not None:
                return ResolvedModel(name, folder, "modelscope")
    raise ModelNotFound(
        f"model {name!r} not found (sources: {', '.join(sources)}); looked in: " + "; ".join(looked)
        + ". Give a folder path, put the model under USF_MODEL_PATH as {org}--{model}, or import a GGUF file "
        "with `usf-bios models import-gguf`."
    )
