"""Web sessions: an API key is exchanged once for a random session token held in an HttpOnly cookie. The
database keeps only the token's SHA-256 digest, the key it acts for, an expiry and the session's CSRF token.
A session ends at sign-out, at expiry, or as soon as its key is revoked or expires (checked on every request).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.db import ApiKey, UiSession, as_utc, utcnow
from app.keys import is_expired


@dataclass(frozen=True)
class SignedIn:
    """The signed-in key and the CSRF token every form post of this session must carry."""

    key: ApiKey
    csrf: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(session: Session, key: ApiKey, *, hours: float) -> str:
    """Start a session for ``key``; returns the cookie's token (never stored). Expired sessions are swept."""
    session.execute(delete(UiSession).where(UiSession.expires_at <= utcnow()))
    token = secrets.token_urlsafe(32)
    session.add(
        UiSession(
            digest=_digest(token),
            key_id=key.id,
            csrf=secrets.token_urlsafe(32),
            expires_at=utcnow() + timedelta(hours=hours),
        )
    )
    session.commit()
    return token


def find_session(session: Session, token: str | None) -> SignedIn | None:
    """The live session for a cookie token: not expired, its key neither revoked nor expired."""
    if not token or len(token) > 256:
        return None
    row = session.get(UiSession, _digest(token))
    if row is None:
        return None
    expires = as_utc(row.expires_at)
    key = session.get(ApiKey, row.key_id)
    if expires <= utcnow() or key is None or key.revoked or is_expired(key):
        return None
    return SignedIn(key=key, csrf=row.csrf)


def close_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(UiSession).where(UiSession.digest == _digest(token)))
        session.commit()


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens; a missing one never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
