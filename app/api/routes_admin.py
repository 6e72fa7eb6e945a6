"""``/v1/audit-log`` and ``/v1/keys``: the audit log and key revocation, for admin keys only."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, status

from app.api.deps import CurrentKey, SessionDep
from app.db import ApiKey, audit_events, record_event
from app.keys import revoke_key

router = APIRouter(prefix="/v1/audit-log", tags=["admin"])
keys_router = APIRouter(prefix="/v1/keys", tags=["admin"])


def _admin(key: ApiKey) -> None:
    if key.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")


@router.get("", summary="Recent audit events (admin only)")
def get_audit_log(session: SessionDep, key: CurrentKey, limit: int = Query(100, ge=1, le=10_000)) -> list[dict]:
    _admin(key)
    return [
        {
            "at": e.at.isoformat(),
            "key_id": e.key_id,
            "action": e.action,
            "model": e.model,
            "counts": e.counts,
            "outcome": e.outcome,
            "dataset_id": e.dataset_id,
            "detail": e.detail,
        }
        for e in audit_events(session, limit=limit)
    ]


@keys_router.post("/{prefix}/revoke", summary="Revoke an API key (admin only); it is refused from the next request")
def revoke(prefix: str, session: SessionDep, key: CurrentKey) -> dict:
    _admin(key)
    row = revoke_key(session, prefix)  # NotFound → 404 (app.errors)
    record_event(session, action="key.revoke", outcome="ok", key_id=key.id, detail=f"revoked {row.prefix}")
    return {"prefix": row.prefix, "revoked": True}
