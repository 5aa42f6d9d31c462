"""Request dependencies: the database session, the caller (API key), the storage layout, the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, WebSocket, status
from sqlalchemy.orm import Session

from usf_bios.api.bodies import bearer
from usf_bios.control.keys import LOCAL_USER, Caller
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the route function (``SessionDep``). Async on purpose: its cleanup (which hands the connection
    back to the pool) runs on the event loop and never needs a worker thread; a sync generator's cleanup waited for
    a thread of the pool the routes run in, and with every thread waiting for a connection none came back (under ~50
    concurrent requests the server stopped answering for good). It ends when the route function returns, before
    the answer is sent (so an event stream holds no connection), and at most ``SESSIONS_AT_ONCE`` requests hold one:
    the rest wait on the event loop, without a thread, and never for a connection."""
    session = request.app.state.db.sessions()
    try:
        yield session
    finally:
        session.close()


def missing_key() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": "Bearer"})


def refused_key() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key",
                         headers={"WWW-Authenticate": "Bearer"})


async def caller_of(app: Any, key: str | None) -> Caller:
    """The caller a presented key stands for (valid keys cached, api/reads.py): no key is the local user where keys
    are not required, else a 401; an unknown or revoked key a 401. The one rule for /api, /v1 and WebSockets."""
    if key is None:
        if app.state.auth_required:
            raise missing_key()
        return LOCAL_USER
    caller = await app.state.reads.caller(key)
    if caller is None:
        raise refused_key()
    return caller


SESSIONS_AT_ONCE = 30   # below the pool's connections (control/db.py POOL), beside the scheduler and token workers
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=SESSIONS_AT_ONCE)]


async def get_caller(request: Request) -> Caller:
    known = getattr(request.state, "caller", None)   # already checked before the body was read (api/bodies.py)
    if known is not None:
        return known
    return await caller_of(request.app, bearer(request.headers.get("authorization")))


async def get_ws_caller(websocket: WebSocket) -> Caller:
    """WebSockets: the key comes as a Bearer header or, from browsers, as ?token=."""
    key = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    return await caller_of(websocket.app, key)


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
