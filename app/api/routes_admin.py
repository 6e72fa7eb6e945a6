"""``/v1/audit-log``: the audit log, for admin keys only."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, status

from app.api.deps import CurrentKey, SessionDep
from app.db import audit_events

router = APIRouter(prefix="/v1/audit-log", tags=["admin"])


@router.get("", summary="Recent audit events (admin only)")
def get_audit_log(session: SessionDep, key: CurrentKey, limit: int = Query(100, ge=1, le=10_000)) -> list[dict]:
    if key.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
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
