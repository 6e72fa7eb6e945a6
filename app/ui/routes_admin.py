"""``/ui/admin``: keys (create, shown once; quotas; revoke) and the audit log with filters, for admin keys only."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from app.api.deps import SessionDep, SettingsDep
from app.db import audit_events, record_event
from app.keys import ROLES, create_key, key_state, list_keys, revoke_key, set_quota
from app.ui.deps import Admin, AdminPoster, Form, render, see_other, viewed
from app.ui.sessions import SignedIn
from generators.errors import InvalidInput

router = APIRouter(prefix="/ui/admin", include_in_schema=False)


def _keys_page(request: Request, session, settings, user: SignedIn, *, new_key: str | None = None, error=None):
    keys = [
        {
            "prefix": row.prefix,
            "role": row.role,
            "quota": row.quota_samples_per_day,
            "state": key_state(row),
            "created": row.created_at,
        }
        for row in list_keys(session)
    ]
    return render(
        request,
        "admin_keys.html",
        user,
        status_code=422 if error else 200,
        keys=keys,
        roles=ROLES,
        default_quota=settings.default_daily_quota,
        new_key=new_key,
        error=error,
    )


@router.get("/keys")
def keys_page(request: Request, session: SessionDep, settings: SettingsDep, user: Admin) -> Response:
    viewed(session, user, request)
    return _keys_page(request, session, settings, user)


@router.post("/keys")
def keys_create(
    request: Request, session: SessionDep, settings: SettingsDep, user: AdminPoster, form: Form
) -> Response:
    try:
        quota = int(form["quota"]) if form.get("quota", "").strip() else None
        expires = float(form["expires_days"]) if form.get("expires_days", "").strip() else None
        row, token = create_key(session, role=form.get("role", ""), quota_samples_per_day=quota, expires_days=expires)
    except (ValueError, InvalidInput) as error:
        message = str(error) if isinstance(error, InvalidInput) else "quota and expiry must be numbers"
        return _keys_page(request, session, settings, user, error=message)
    record_event(
        session, action="key.create", outcome="ok", key_id=user.key.id, detail=f"created {row.prefix} ({row.role})"
    )
    return _keys_page(request, session, settings, user, new_key=token)  # shown once, never stored


@router.post("/keys/{prefix}/revoke")
def keys_revoke(prefix: str, session: SessionDep, user: AdminPoster) -> RedirectResponse:
    row = revoke_key(session, prefix)
    record_event(session, action="key.revoke", outcome="ok", key_id=user.key.id, detail=f"revoked {row.prefix}")
    return see_other("/ui/admin/keys")


@router.post("/keys/{prefix}/quota")
def keys_quota(prefix: str, session: SessionDep, user: AdminPoster, form: Form) -> RedirectResponse:
    raw = form.get("quota", "").strip()
    try:
        quota = int(raw) if raw else None
    except ValueError:
        raise InvalidInput("a quota is a whole number of samples per day") from None
    row = set_quota(session, prefix, quota)
    record_event(session, action="key.quota", outcome="ok", key_id=user.key.id, detail=f"{row.prefix}: {quota}")
    return see_other("/ui/admin/keys")


@router.get("/audit")
def audit_page(
    request: Request, session: SessionDep, user: Admin, action: str = "", key: str = "", limit: int = 200
) -> Response:
    viewed(session, user, request)
    limit = max(1, min(limit, 5000))
    events = audit_events(session, limit=limit, action=action.strip() or None, key_prefix=key.strip() or None)
    prefixes = {row.id: row.prefix for row in list_keys(session)}
    return render(
        request, "admin_audit.html", user, events=events, prefixes=prefixes, action=action, key=key, limit=limit
    )
