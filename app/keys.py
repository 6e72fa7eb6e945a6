"""API keys: created once (the plaintext is shown only then), stored as SHA-256 digests, checked in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import ApiKey
from generators.errors import InvalidInput

ROLES = ("researcher", "admin")
KEY_PREFIX = "sck"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, role: str, quota_samples_per_day: int | None = None) -> tuple[ApiKey, str]:
    """Store a new key and return ``(row, plaintext)``; the plaintext is never stored or shown again."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose one of {list(ROLES)}")
    if quota_samples_per_day is not None and quota_samples_per_day < 1:
        raise InvalidInput("--quota-samples-per-day must be at least 1")
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(prefix=prefix, digest=_digest(secret), role=role, quota_samples_per_day=quota_samples_per_day)
    session.add(row)
    session.commit()
    return row, f"{KEY_PREFIX}_{prefix}_{secret}"


def verify_key(session: Session, token: str) -> ApiKey | None:
    """The active key for a bearer token, or ``None``."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or row.revoked:
        return None
    return row if hmac.compare_digest(row.digest, _digest(parts[2])) else None
