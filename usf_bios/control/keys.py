"""API keys: created once, shown once, stored as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone

from sqlalchemy.orm import Session

from usf_bios.control.tables import ApiKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """A new key row and the plaintext key (never stored)."""
    plaintext = "usf_" + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=plaintext[:10], key_hash=hash_key(plaintext), is_admin=is_admin)
    session.add(row)
    session.commit()
    return row, plaintext


def revoke_key(session: Session, row: ApiKey) -> None:
    row.revoked_at = datetime.now(timezone.utc)
    session.commit()
