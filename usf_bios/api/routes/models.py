"""Models: register a folder or a cache entry (offline), scan the model folders, list, show, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from usf_bios.api.deps import AdminCaller, CurrentCaller, LayoutDep, SessionDep, SettingsDep
from usf_bios.control import models
from usf_bios.control.schemas import ModelCreate, ModelPublic, PullCreate, PullPublic, ScanResult

router = APIRouter(tags=["models"])


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelPublic)
def create(body: ModelCreate, caller: CurrentCaller, session: SessionDep, layout: LayoutDep,
           settings: SettingsDep) -> ModelPublic:
    row = models.register_model(session=session, caller=caller, body=body, layout=layout, settings=settings)
    return ModelPublic.model_validate(row)


@router.post("/models/scan", response_model=ScanResult)
def scan(caller: CurrentCaller, session: SessionDep, layout: LayoutDep, settings: SettingsDep) -> ScanResult:
    return models.scan_models(session=session, caller=caller, layout=layout, settings=settings)


@router.post("/models/pull", status_code=status.HTTP_202_ACCEPTED, response_model=PullPublic)
def pull(body: PullCreate, request: Request, caller: AdminCaller) -> PullPublic:
    """Download a model from the Hugging Face Hub into the hub cache, or with source `modelscope` from ModelScope
    into MODELSCOPE_CACHE (admin; the source in SUPPORTED_MODEL_SOURCES, and for ModelScope its SDK installed):
    config, tokenizer and weights, safetensors preferred; the server's HF_TOKEN / MODELSCOPE_API_TOKEN and
    HF_ENDPOINT / MODELSCOPE_ENDPOINT. Registered once complete; follow it with GET /models/pulls/{id}. The same
    source, repo and revision under way answers with that pull."""
    pulls = request.app.state.pulls
    return pulls.public(pulls.start(caller, body))


@router.get("/models/pulls/{pull_id}", response_model=PullPublic)
def pull_status(pull_id: str, request: Request, caller: CurrentCaller) -> PullPublic:
    """A pull's progress: bytes in the cache of the total, then the registered model (or the error)."""
    pulls = request.app.state.pulls
    return pulls.public(pulls.get(caller, pull_id))


@router.get("/models", response_model=list[ModelPublic])
def list_models(caller: CurrentCaller, session: SessionDep) -> list[ModelPublic]:
    return models.list_models(session=session, caller=caller)


@router.get("/models/{ref:path}", response_model=ModelPublic)
def get(ref: str, caller: CurrentCaller, session: SessionDep) -> ModelPublic:
    return ModelPublic.model_validate(models.get_model(session=session, caller=caller, ref=ref))


@router.delete("/models/{ref:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete(ref: str, caller: CurrentCaller, session: SessionDep) -> None:
    models.delete_model(session=session, row=models.get_model(session=session, caller=caller, ref=ref))
