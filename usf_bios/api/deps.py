"""Request dependencies: the database session, the caller (API key), the storage layout, the settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, WebSocket, status
from sqlalchemy.orm import Session

from usf_bios.control.keys import LOCAL_USER, Caller, caller_for_key
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


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
        return LOCAL_USER
    caller = caller_for_key(session, key)
    if caller is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return caller


SessionDep = Annotated[Session, Depends(get_session)]


def get_caller(request: Request, session: SessionDep) -> Caller:
    return caller_for(_bearer(request.headers.get("authorization")), session, request.app.state.auth_required)


def get_ws_caller(websocket: WebSocket, session: Session) -> Caller:
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
