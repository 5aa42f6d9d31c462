"""API keys (admin only): create, list, revoke."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from usf_bios.api.deps import AdminCaller, SessionDep
from usf_bios.control.keys import create_key, revoke_key
from usf_bios.control.tables import ApiKey

router = APIRouter(tags=["keys"])


class KeyCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=100)
    is_admin: bool = False


class KeyPublic(BaseModel):
    id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(..., description="The key itself; shown once, only a hash is stored.")


def _public(row: ApiKey) -> dict:
    return {"id": row.id, "name": row.name, "prefix": row.prefix, "is_admin": row.is_admin,
            "created_at": row.created_at, "revoked_at": row.revoked_at}


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create(body: KeyCreate, _admin: AdminCaller, session: SessionDep) -> dict:
    row, plaintext = create_key(session, body.name, body.is_admin)
    return {**_public(row), "key": plaintext}


@router.get("/keys", response_model=list[KeyPublic])
def list_keys(_admin: AdminCaller, session: SessionDep) -> list[dict]:
    return [_public(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke(key_id: str, _admin: AdminCaller, session: SessionDep) -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no key {key_id!r}")
    revoke_key(session, row)
