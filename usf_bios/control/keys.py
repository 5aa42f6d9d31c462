"""API keys and who is asking: keys are created once, shown once and stored as a SHA-256 hash; a ``Caller`` is
the key a request came with, and every owner-scoped lookup of the control plane goes through the helpers here."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from usf_bios.control.errors import NotFound
from usf_bios.control.tables import ApiKey


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


LOCAL_USER = Caller(key_id=None, is_admin=True)


def owned_by(owner_column: Any, owner: str | None) -> ColumnElement[bool]:
    """``owner_column`` is ``owner`` (IS NULL for the local user's rows)."""
    return owner_column.is_(None) if owner is None else owner_column == owner


def name_taken(session: Session, table: Any, owner: str | None, name: str) -> bool:
    """Whether ``owner`` already has a row named ``name`` in ``table``."""
    query = select(table.id).where(owned_by(table.owner_key_id, owner), table.name == name)
    return session.scalar(query) is not None


def find_owned(session: Session, caller: Caller, table: Any, ref: str) -> Any:
    """A row of ``table`` (with id, name, owner_key_id, created_at) by id, else by name, among what the
    caller may see; an admin matching several keys' rows by name gets their own first, else the newest."""
    if "\x00" in ref:  # no id or name holds a NUL byte (and PostgreSQL refuses one in a query)
        return None
    row = session.get(table, ref)
    if row is not None and caller.can_see(row.owner_key_id):
        return row
    if not hasattr(table, "name"):
        return None
    query = caller.scope(select(table).where(table.name == ref), table.owner_key_id)
    rows = list(session.scalars(query.order_by(table.created_at.desc())))
    own = [r for r in rows if r.owner_key_id == caller.owner]
    return (own or rows or [None])[0]


def get_owned(session: Session, caller: Caller, table: Any, ref: str, what: str) -> Any:
    """``find_owned`` or NotFound, which reads the same whether the row is missing or another key's."""
    row = find_owned(session, caller, table, ref)
    if row is None:
        raise NotFound(what, ref)
    return row


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """A new key row and the plaintext key (never stored)."""
    plaintext = "usf_" + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=plaintext[:10], key_hash=hash_key(plaintext), is_admin=is_admin)
    session.add(row)
    session.commit()
    return row, plaintext


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id) if "\x00" not in key_id else None
    if row is None:
        raise NotFound("key", key_id)
    row.revoked_at = datetime.now(timezone.utc)
    session.commit()
    return row


def caller_for_key(session: Session, key: str) -> Caller | None:
    """The caller a presented key stands for, or None for an unknown or revoked key."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return Caller(key_id=row.id, is_admin=row.is_admin)
