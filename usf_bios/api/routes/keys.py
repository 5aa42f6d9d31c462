"""API keys (admin only): create, list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, status

from usf_bios.api.deps import AdminCaller, SessionDep
from usf_bios.control import keys
from usf_bios.control.schemas import KeyCreate, KeyCreated, KeyPublic

router = APIRouter(tags=["keys"])


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create(body: KeyCreate, _admin: AdminCaller, session: SessionDep) -> KeyCreated:
    row, plaintext = keys.create_key(session, body.name, body.is_admin)
    return KeyCreated.model_validate({**KeyPublic.model_validate(row).model_dump(), "key": plaintext})


@router.get("/keys", response_model=list[KeyPublic])
def list_keys(_admin: AdminCaller, session: SessionDep) -> list[KeyPublic]:
    return [KeyPublic.model_validate(row) for row in keys.list_keys(session)]


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke(key_id: str, _admin: AdminCaller, session: SessionDep) -> None:
    keys.revoke_key(session, key_id)
