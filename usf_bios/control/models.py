"""Models: register a folder or a cache entry (offline), scan the model folders, list, find, delete.

Registration only records where a model lies; it never moves, copies or deletes the model's files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usf_bios.control.errors import Conflict, Forbidden, Invalid
from usf_bios.control.keys import Caller, find_owned, get_owned, name_taken, owned_by
from usf_bios.control.schemas import ModelCreate, ModelPublic, ScanResult, ScanSkipped
from usf_bios.control.tables import Job, ModelEntry
from usf_bios.models.inspect import folder_size, parameter_count
from usf_bios.models.sources import huggingface_snapshot, modelscope_folder, modelscope_snapshot
from usf_bios.models.validate import ModelFolderError, check_model_folder
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


class NotAllowed(ValueError):
    """A folder (or a file in it) resolves outside the roots models may be registered from."""


def allowed_roots(layout: StorageLayout, settings: Settings) -> list[Path]:
    """USF_MODEL_PATH, HF_HOME (and the hub cache), the ModelScope cache, USF_ALLOWED_MODEL_ROOTS; resolved."""
    roots = [layout.models, settings.hf_home, layout.hf_hub_cache, layout.modelscope_cache,
             *settings.allowed_model_roots]
    return list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots if r is not None))


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def confine_to_roots(folder: Path, roots: list[Path], show_roots: bool = True) -> Path:
    """The folder with symlinks resolved, if it and the files it links to lie inside an allowed root. The roots'
    absolute paths are named in the refusal only where ``show_roots`` (an admin asks)."""
    listed = (": " + ", ".join(str(r) for r in roots)) if show_roots else ""
    allowed = f"the folders models may be registered from{listed} (add more with USF_ALLOWED_MODEL_ROOTS)"
    try:
        resolved = folder.resolve()
        if not _inside(resolved, roots):
            raise NotAllowed(f"{folder} is outside {allowed}")
        links = [entry for entry in resolved.iterdir() if entry.is_symlink()] if resolved.is_dir() else []
    except (OSError, RuntimeError) as err:  # a symlink loop, a name too long for the file system
        raise NotAllowed(f"{folder} cannot be resolved ({err.strerror if isinstance(err, OSError) else err})") from None
    for entry in links:
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):
            continue  # a loop: check_model_folder reports the file as missing
        if not _inside(target, roots):
            raise NotAllowed(f"{entry.name} in {folder} links outside {allowed}")
    return resolved


def describe_folder(folder: Path) -> dict:
    """The stored facts of a valid model folder; raises ModelFolderError listing what is missing."""
    config = check_model_folder(folder)
    return {"path": str(folder), "model_type": config.get("model_type"), "parameters": parameter_count(folder),
            "size_bytes": folder_size(folder), "valid": True, "problems": []}


def _request_folder(body: ModelCreate, layout: StorageLayout, settings: Settings) -> Path:
    if body.source not in settings.supported_model_sources:
        raise Invalid("source", f"{body.source!r} is not enabled on this server "
                                f"(SUPPORTED_MODEL_SOURCES={','.join(settings.supported_model_sources)})")
    if body.source == "local":
        assert body.path is not None
        return layout.models / Path(body.path).expanduser()  # an absolute path replaces the base
    assert body.repo_id is not None
    if body.source == "huggingface":
        found = huggingface_snapshot(layout.hf_hub_cache, body.repo_id)
        where = "the Hugging Face cache"
    else:
        found = modelscope_folder(layout.modelscope_cache, body.repo_id)
        where = "the ModelScope cache"
    if found is None:
        raise Invalid("repo_id", f"{body.repo_id} is not in {where}; registration is offline, download the model first")
    return found


def _insert(session: Session, row: ModelEntry) -> ModelEntry:
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"you already have a model named {row.name!r}") from None
    session.refresh(row)
    return row


def register_model(*, session: Session, caller: Caller, body: ModelCreate, layout: StorageLayout,
                   settings: Settings) -> ModelEntry:
    folder = _request_folder(body, layout, settings)
    try:
        resolved = confine_to_roots(folder, allowed_roots(layout, settings), show_roots=caller.is_admin)
    except NotAllowed as err:
        raise Forbidden(str(err)) from None
    if name_taken(session, ModelEntry, caller.owner, body.name):
        raise Conflict(f"you already have a model named {body.name!r}")
    try:
        facts = describe_folder(resolved)
    except ModelFolderError as err:
        field = "path" if body.source == "local" else "repo_id"
        raise Invalid(field, f"{body.path or body.repo_id} is not a usable model folder: {'; '.join(err.problems)}") from None
    return _insert(session, ModelEntry(name=body.name, source=body.source, repo_id=body.repo_id,
                                       owner_key_id=caller.owner, **facts))


def _subfolders(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in exclude)


def scan_candidates(layout: StorageLayout, sources: tuple[str, ...]) -> Iterator[tuple[Path, str, str, str | None]]:
    """(folder, name, source, repo_id) for every model folder the enabled sources hold."""
    if "local" in sources:
        for folder in _subfolders(layout.models):
            yield folder, folder.name, "local", None
    if "huggingface" in sources:
        for repo in _subfolders(layout.hf_hub_cache):
            if repo.name.startswith("models--"):
                repo_id = repo.name[len("models--"):].replace("--", "/", 1)
                snapshot = huggingface_snapshot(layout.hf_hub_cache, repo_id)
                if snapshot is not None:
                    yield snapshot, repo_id, "huggingface", repo_id
    if "modelscope" in sources:
        cache = layout.modelscope_cache
        bases = ((cache / "models", ()), (cache / "hub" / "models", ()), (cache, ("models", "hub")),
                 (cache / "hub", ("models", "datasets")))
        for repo in _subfolders(cache / "models"):
            repo_id = repo.name.replace("--", "/", 1)
            if "/" in repo_id and (snapshot := modelscope_snapshot(cache, repo_id)) is not None:
                yield snapshot, repo_id, "modelscope", repo_id
        for base, exclude in bases:
            for org in _subfolders(base, exclude):
                if "--" in org.name and (org / "snapshots").is_dir():
                    continue   # the snapshot layout, above
                for folder in _subfolders(org):
                    repo_id = f"{org.name}/{folder.name.replace('___', '.')}"
                    yield folder, repo_id, "modelscope", repo_id


def scan_models(*, session: Session, caller: Caller, layout: StorageLayout, settings: Settings) -> ScanResult:
    roots = allowed_roots(layout, settings)
    mine = session.scalars(select(ModelEntry).where(owned_by(ModelEntry.owner_key_id, caller.owner))).all()
    names = {row.name for row in mine}
    paths = {row.path: row.name for row in mine}
    registered: list[ModelEntry] = []
    skipped: list[ScanSkipped] = []
    for folder, name, source, repo_id in scan_candidates(layout, settings.supported_model_sources):
        try:
            resolved = confine_to_roots(folder, roots, show_roots=caller.is_admin)
        except NotAllowed as err:
            skipped.append(ScanSkipped(path=str(folder), reason=str(err)))
            continue
        if str(resolved) in paths:
            skipped.append(ScanSkipped(path=str(folder), reason=f"already registered as {paths[str(resolved)]!r}"))
            continue
        if name in names:
            skipped.append(ScanSkipped(path=str(folder), reason=f"a model named {name!r} is already registered"))
            continue
        try:
            facts = describe_folder(resolved)
        except ModelFolderError as err:
            skipped.append(ScanSkipped(path=str(folder), reason="not a usable model folder: " + "; ".join(err.problems)))
            continue
        row = ModelEntry(name=name, source=source, repo_id=repo_id, owner_key_id=caller.owner, **facts)
        session.add(row)
        registered.append(row)
        names.add(name)
        paths[str(resolved)] = name
    session.commit()
    for row in registered:
        session.refresh(row)
    return ScanResult(registered=[ModelPublic.model_validate(r) for r in registered], skipped=skipped)


def find_model(session: Session, caller: Caller, ref: str) -> ModelEntry | None:
    """The caller's model by id, else by name; None when the caller cannot see one."""
    return find_owned(session, caller, ModelEntry, ref)


def get_model(*, session: Session, caller: Caller, ref: str) -> ModelEntry:
    return get_owned(session, caller, ModelEntry, ref, "model")


def list_models(*, session: Session, caller: Caller) -> list[ModelPublic]:
    query = caller.scope(select(ModelEntry), ModelEntry.owner_key_id).order_by(ModelEntry.created_at)
    return [ModelPublic.model_validate(r) for r in session.scalars(query)]


def delete_model(*, session: Session, row: ModelEntry) -> None:
    """Remove the row only; the model's files stay where they are."""
    job = session.scalar(select(Job.id).where(Job.model_id == row.id).limit(1))
    if job is not None:
        raise Conflict(f"model {row.name!r} is used by job {job}; delete the job first")
    session.delete(row)
    session.commit()
