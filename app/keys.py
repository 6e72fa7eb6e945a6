"""API keys: created once (the plaintext is shown only then), stored as SHA-256 digests, checked in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import ApiKey, as_utc, utcnow
from generators.errors import InvalidInput, NotFound

ROLES = ("researcher", "admin")
KEY_PREFIX = "sck"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    session: Session, *, role: str, quota_samples_per_day: int | None = None, expires_days: float | None = None
) -> tuple[ApiKey, str]:
    """Store a new key and return ``(row, plaintext)``; the plaintext is never stored or shown again. With
    ``expires_days`` the key stops working that many days from now."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose one of {list(ROLES)}")
    if quota_samples_per_day is not None and quota_samples_per_day < 1:
        raise InvalidInput("--quota-samples-per-day must be at least 1")
    if expires_days is not None and not 0 < expires_days <= 3650:
        raise InvalidInput("--expires-days must be in (0, 3650]")
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(days=expires_days) if expires_days is not None else None
    row = ApiKey(
        prefix=prefix,
        digest=_digest(secret),
        role=role,
        quota_samples_per_day=quota_samples_per_day,
        expires_at=expires_at,
    )
    session.add(row)
    session.commit()
    return row, f"{KEY_PREFIX}_{prefix}_{secret}"


def verify_key(session: Session, token: str) -> ApiKey | None:
    """The active key for a bearer token (not revoked, not expired), or ``None``. Read from the database on every
    call, so a revocation holds at once for every API process sharing it."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or row.revoked or is_expired(row):
        return None
    return row if hmac.compare_digest(row.digest, _digest(parts[2])) else None


def is_expired(row: ApiKey) -> bool:
    if row.expires_at is None:
        return False
    expires = as_utc(row.expires_at)
    return expires <= datetime.now(UTC)


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first (prefix, role, quota and state only: the secret is not stored)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def key_state(row: ApiKey) -> str:
    """``revoked``, ``expired``, ``active`` or ``active until YYYY-MM-DD``."""
    if row.revoked:
        return "revoked"
    if is_expired(row):
        return "expired"
    return f"active until {row.expires_at:%Y-%m-%d}" if row.expires_at else "active"


def _key(session: Session, prefix: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        raise NotFound(f"no key with prefix {prefix!r} (`synthcohort keys list` shows them)")
    return row


def set_quota(session: Session, prefix: str, quota_samples_per_day: int | None) -> ApiKey:
    """Set a key's daily sample quota (``None``: the service default).

    Raises:
        NotFound: no key has this prefix.
        InvalidInput: a quota below 1.
    """
    if quota_samples_per_day is not None and quota_samples_per_day < 1:
        raise InvalidInput("a daily quota must be at least 1 sample")
    row = _key(session, prefix)
    row.quota_samples_per_day = quota_samples_per_day
    session.commit()
    return row


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke the key with this prefix (idempotent).

    Raises:
        NotFound: no key has this prefix.
    """
    row = _key(session, prefix)
    row.revoked = True
    session.commit()
    return row
