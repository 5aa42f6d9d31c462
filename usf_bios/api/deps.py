"""Request dependencies: the database session, the caller (API key), the storage layout."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, WebSocket, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from usf_bios.control.keys import hash_key
from usf_bios.control.tables import ApiKey
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


@dataclass(frozen=True)
class Caller:
    """Who is asking: an API key, or the local user when authentication is off (sees everything)."""

    key_id: str | None
    is_admin: bool

    @property
    def owner(self) -> str | None:
        """The owner recorded on what this caller creates."""
        return self.key_id

    def can_see(self, owner_key_id: str | None) -> bool:
        return self.is_admin or owner_key_id == self.key_id

    def scope(self, query: Any, owner_column: Any) -> Any:
        return query if self.is_admin else query.where(owner_column == self.key_id)


def find_owned(session: Session, caller: Caller, table: Any, ref: str) -> Any:
    """A row of ``table`` (with id, name, owner_key_id, created_at) by id, else by name, among what the
    caller may see; an admin matching several keys' rows by name gets their own first, else the newest."""
    if "\x00" in ref:  # no id or name holds a NUL byte (and PostgreSQL refuses one in a query)
        return None
    row = session.get(table, ref)
    if row is not None and caller.can_see(row.owner_key_id):
        return row
    query = caller.scope(select(table).where(table.name == ref), table.owner_key_id)
    rows = list(session.scalars(query.order_by(table.created_at.desc())))
    own = [r for r in rows if r.owner_key_id == caller.owner]
    return (own or rows or [None])[0]


def owned_or_404(session: Session, caller: Caller, table: Any, ref: str, what: str) -> Any:
    """``find_owned`` or a 404 that reads the same whether the row is missing or another key's."""
    row = find_owned(session, caller, table, ref)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {ref!r}")
    return row


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.sessions() as session:
        yield session


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def caller_for(key: str | None, session: Session, auth_required: bool) -> Caller:
    if key is None:
        if auth_required:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        return Caller(key_id=None, is_admin=True)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return Caller(key_id=row.id, is_admin=row.is_admin)


SessionDep = Annotated[Session, Depends(get_session)]


def get_caller(request: Request, session: SessionDep) -> Caller:
    return caller_for(_bearer(request.headers.get("authorization")), session, request.app.state.auth_required)


def get_ws_caller(websocket: WebSocket, session: SessionDep) -> Caller:
    """WebSockets: the key comes as a Bearer header or, from browsers, as ?token=."""
    key = _bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    return caller_for(key, session, websocket.app.state.auth_required)


def get_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if not caller.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin key")
    return caller


def get_layout(request: Request) -> StorageLayout:
    return request.app.state.layout


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


CurrentCaller = Annotated[Caller, Depends(get_caller)]
AdminCaller = Annotated[Caller, Depends(get_admin)]
LayoutDep = Annotated[StorageLayout, Depends(get_layout)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
