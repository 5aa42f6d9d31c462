"""Models: register a folder or a cache entry (offline), scan the model folders, list, show, delete."""

from __future__ import annotations

from fastapi import APIRouter, status

from usf_bios.api.deps import CurrentCaller, LayoutDep, SessionDep, SettingsDep
from usf_bios.control import models
from usf_bios.control.schemas import ModelCreate, ModelPublic, ScanResult

router = APIRouter(tags=["models"])


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelPublic)
def create(body: ModelCreate, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
           settings: SettingsDep) -> ModelPublic:
    row = models.register_model(session=session, caller=caller, body=body, layout=layout, settings=settings)
    return ModelPublic.model_validate(row)


@router.post("/models/scan", response_model=ScanResult)
def scan(caller: CurrentCaller, session: SessionDep, layout: LayoutDep, settings: SettingsDep) -> ScanResult:
    return models.scan_models(session=session, caller=caller, layout=layout, settings=settings)


@router.get("/models", response_model=list[ModelPublic])
def list_models(caller: CurrentCaller, session: SessionDep) -> list[ModelPublic]:
    return models.list_models(session=session, caller=caller)


@router.get("/models/{ref:path}", response_model=ModelPublic)
def get(ref: str, caller: CurrentCaller, session: SessionDep) -> ModelPublic:
    return ModelPublic.model_validate(models.get_model(session=session, caller=caller, ref=ref))


@router.delete("/models/{ref:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete(ref: str, caller: CurrentCaller, session: SessionDep) -> None:
    models.delete_model(session=session, row=models.get_model(session=session, caller=caller, ref=ref))
