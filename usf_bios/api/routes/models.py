"""Models: register a folder or a cache entry (offline), scan the model folders, list, show, delete.

Registration only records where a model lies; it never moves, copies or deletes the model's files.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from usf_bios.api.deps import Caller, CurrentCaller, LayoutDep, SessionDep, SettingsDep, find_owned, owned_or_404
from usf_bios.control.tables import Job, ModelEntry
from usf_bios.models.inspect import folder_size, parameter_count
from usf_bios.models.sources import huggingface_snapshot, modelscope_folder
from usf_bios.models.validate import ModelFolderError, check_model_folder
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout

router = APIRouter(tags=["models"])

REPO_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*/[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
NAME = r"^[^\x00-\x1f\x7f]+$"


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, pattern=NAME)
    source: Literal["local", "huggingface", "modelscope"]
    path: str | None = Field(None, min_length=1, max_length=4096, pattern=NAME,
                             description="source local: the model folder (absolute, or relative to USF_MODEL_PATH).")
    repo_id: str | None = Field(None, max_length=200, pattern=REPO_ID,
                                description="source huggingface/modelscope: org/name, found in the local cache.")

    @model_validator(mode="after")
    def _source_fields(self) -> "ModelCreate":
        if self.source == "local" and not self.path:
            raise ValueError("path is required for source 'local'")
        if self.source != "local":
            if not self.repo_id:
                raise ValueError(f"repo_id (org/name) is required for source {self.source!r}")
            if self.path:
                raise ValueError(f"path is only for source 'local'; source {self.source!r} is found by repo_id")
        return self


class ModelPublic(BaseModel):
    id: str
    name: str
    source: str
    repo_id: str | None
    path: str
    model_type: str | None
    parameters: int | None
    size_bytes: int | None
    valid: bool
    problems: list[str]
    created_at: datetime


class ScanSkipped(BaseModel):
    path: str
    reason: str


class ScanResult(BaseModel):
    registered: list[ModelPublic]
    skipped: list[ScanSkipped]


class NotAllowed(ValueError):
    """A folder (or a file in it) resolves outside the roots models may be registered from."""


def _public(row: ModelEntry) -> dict:
    return {"id": row.id, "name": row.name, "source": row.source, "repo_id": row.repo_id, "path": row.path,
            "model_type": row.model_type, "parameters": row.parameters, "size_bytes": row.size_bytes,
            "valid": row.valid, "problems": list(row.problems or []), "created_at": row.created_at}


def allowed_roots(layout: StorageLayout, settings: Settings) -> list[Path]:
    """USF_MODEL_PATH, HF_HOME (and the hub cache), the ModelScope cache, USF_ALLOWED_MODEL_ROOTS; resolved."""
    roots = [layout.models, settings.hf_home, layout.hf_hub_cache, layout.modelscope_cache,
             *settings.allowed_model_roots]
    return list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots if r is not None))


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def confine_to_roots(folder: Path, roots: list[Path]) -> Path:
    """The folder with symlinks resolved, if it and the files it links to lie inside an allowed root."""
    listed = ", ".join(str(r) for r in roots)
    try:
        resolved = folder.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise NotAllowed(f"{folder} cannot be resolved ({err})") from None
    if not _inside(resolved, roots):
        raise NotAllowed(f"{folder} is outside the folders models may be registered from: {listed} "
                         "(add more with USF_ALLOWED_MODEL_ROOTS)")
    links = [entry for entry in resolved.iterdir() if entry.is_symlink()] if resolved.is_dir() else []
    for entry in links:
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):
            continue  # a loop: check_model_folder reports the file as missing
        if not _inside(target, roots):
            raise NotAllowed(f"{entry.name} in {folder} links outside the folders models may be registered from: "
                            f"{listed} (add more with USF_ALLOWED_MODEL_ROOTS)")
    return resolved


def describe_folder(folder: Path) -> dict:
    """The stored facts of a valid model folder; raises ModelFolderError listing what is missing."""
    config = check_model_folder(folder)
    return {"path": str(folder), "model_type": config.get("model_type"), "parameters": parameter_count(folder),
            "size_bytes": folder_size(folder), "valid": True, "problems": []}


def _request_folder(body: ModelCreate, layout: StorageLayout, settings: Settings) -> Path:
    if body.source not in settings.supported_model_sources:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"source {body.source!r} is not enabled on this server "
                            f"(SUPPORTED_MODEL_SOURCES={','.join(settings.supported_model_sources)})")
    if body.source == "local":
        assert body.path is not None
        return layout.models / Path(body.path).expanduser()  # an absolute path replaces the base
    assert body.repo_id is not None
    if body.source == "huggingface":
        found = huggingface_snapshot(layout.hf_hub_cache, body.repo_id)
        where = f"the Hugging Face cache {layout.hf_hub_cache}"
    else:
        found = modelscope_folder(layout.modelscope_cache, body.repo_id)
        where = f"the ModelScope cache {layout.modelscope_cache}"
    if found is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"{body.repo_id} is not in {where}; registration is offline, download the model first")
    return found


def _name_taken(session: Session, owner: str | None, name: str) -> bool:
    query = select(ModelEntry.id).where(ModelEntry.owner_key_id == owner, ModelEntry.name == name)
    return session.scalar(query) is not None


def _insert(session: Session, row: ModelEntry) -> ModelEntry:
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"you already have a model named {row.name!r}") from None
    session.refresh(row)
    return row


def register_model(session: Session, caller: Caller, body: ModelCreate, layout: StorageLayout,
                   settings: Settings) -> ModelEntry:
    folder = _request_folder(body, layout, settings)
    try:
        resolved = confine_to_roots(folder, allowed_roots(layout, settings))
    except NotAllowed as err:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(err)) from None
    if _name_taken(session, caller.owner, body.name):
        raise HTTPException(status.HTTP_409_CONFLICT, f"you already have a model named {body.name!r}")
    try:
        facts = describe_folder(resolved)
    except ModelFolderError as err:
        problems = "; ".join(err.problems)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"{body.path or body.repo_id} is not a usable model folder: {problems}") from None
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
        for base, exclude in bases:
            for org in _subfolders(base, exclude):
                for folder in _subfolders(org):
                    repo_id = f"{org.name}/{folder.name.replace('___', '.')}"
                    yield folder, repo_id, "modelscope", repo_id


def scan_models(session: Session, caller: Caller, layout: StorageLayout, settings: Settings) -> dict:
    roots = allowed_roots(layout, settings)
    mine = session.scalars(select(ModelEntry).where(ModelEntry.owner_key_id == caller.owner)).all()
    names = {row.name for row in mine}
    paths = {row.path: row.name for row in mine}
    registered: list[ModelEntry] = []
    skipped: list[dict] = []
    for folder, name, source, repo_id in scan_candidates(layout, settings.supported_model_sources):
        try:
            resolved = confine_to_roots(folder, roots)
        except NotAllowed as err:
            skipped.append({"path": str(folder), "reason": str(err)})
            continue
        if str(resolved) in paths:
            skipped.append({"path": str(folder), "reason": f"already registered as {paths[str(resolved)]!r}"})
            continue
        if name in names:
            skipped.append({"path": str(folder), "reason": f"a model named {name!r} is already registered"})
            continue
        try:
            facts = describe_folder(resolved)
        except ModelFolderError as err:
            skipped.append({"path": str(folder), "reason": "not a usable model folder: " + "; ".join(err.problems)})
            continue
        row = ModelEntry(name=name, source=source, repo_id=repo_id, owner_key_id=caller.owner, **facts)
        session.add(row)
        registered.append(row)
        names.add(name)
        paths[str(resolved)] = name
    session.commit()
    for row in registered:
        session.refresh(row)
    return {"registered": [_public(r) for r in registered], "skipped": skipped}


def find_model(session: Session, caller: Caller, ref: str) -> ModelEntry | None:
    """The caller's model by id, else by name; None when the caller cannot see one."""
    return find_owned(session, caller, ModelEntry, ref)


def _found(session: Session, caller: Caller, ref: str) -> ModelEntry:
    return owned_or_404(session, caller, ModelEntry, ref, "model")


def delete_model(session: Session, row: ModelEntry) -> None:
    """Remove the row only; the model's files stay where they are."""
    job = session.scalar(select(Job.id).where(Job.model_id == row.id).limit(1))
    if job is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"model {row.name!r} is used by job {job}; delete the job first")
    session.delete(row)
    session.commit()


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelPublic)
def create(body: ModelCreate, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
           settings: SettingsDep) -> dict:
    return _public(register_model(session, caller, body, layout, settings))


@router.post("/models/scan", response_model=ScanResult)
def scan(caller: CurrentCaller, session: SessionDep, layout: LayoutDep, settings: SettingsDep) -> dict:
    return scan_models(session, caller, layout, settings)


@router.get("/models", response_model=list[ModelPublic])
def list_models(caller: CurrentCaller, session: SessionDep) -> list[dict]:
    query = caller.scope(select(ModelEntry), ModelEntry.owner_key_id).order_by(ModelEntry.created_at)
    return [_public(r) for r in session.scalars(query)]


@router.get("/models/{ref:path}", response_model=ModelPublic)
def get(ref: str, caller: CurrentCaller, session: SessionDep) -> dict:
    return _public(_found(session, caller, ref))


@router.delete("/models/{ref:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete(ref: str, caller: CurrentCaller, session: SessionDep) -> None:
    delete_model(session, _found(session, caller, ref))
