"""What every page route shares: the session dependencies (signed in, CSRF-checked post, admin), rendering with the
security headers, error pages and the audit of page views. Sign-in exchanges an API key for a session cookie
(HttpOnly, SameSite=Strict, Secure over TLS); every form post carries the session's CSRF token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.api.deps import SessionDep
from app.db import record_event
from app.ui.sessions import SignedIn, find_session, same_token

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "synthcohort_session"
SIGN_IN_COOKIE = "synthcohort_sign_in"  # the sign-in form's double-submit CSRF token (no session yet)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):
    """No live session: the page answers with a redirect to the sign-in form."""


# ------------------------------------------------------------------------------------------------ helpers
def render(request: Request, template: str, user: SignedIn | None, status_code: int = 200, **context: Any):
    """A page: the template with the signed-in user and CSRF token, and the security headers."""
    response = templates.TemplateResponse(
        request, template, {"user": user, "csrf": user.csrf if user else None, **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, status_code: int, message: str, headers: dict | None = None) -> Response:
    """An error on a page, as a page (the JSON API keeps its JSON errors)."""
    user = getattr(request.state, "ui_user", None)
    response = render(request, "error.html", user, status_code=status_code, code=status_code, message=message)
    response.headers.update(headers or {})
    return response


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def signed_in(request: Request, session: SessionDep) -> SignedIn:
    user = find_session(session, request.cookies.get(SESSION_COOKIE))
    if user is None:
        raise SignInRequired
    request.state.ui_user = user
    wait = request.app.state.rate_limiter.wait_seconds(user.key.id)
    if wait:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS, "too many requests; wait a little", {"Retry-After": str(wait)}
        )
    return user


User = Annotated[SignedIn, Depends(signed_in)]


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form as plain strings (file uploads are not accepted anywhere in the pages)."""
    form = await request.form()
    return {name: value for name, value in form.items() if isinstance(value, str)}


Form = Annotated[dict[str, str], Depends(form_fields)]


def posted(user: User, form: Form) -> SignedIn:
    """A form post of the signed-in user: its CSRF token must match the session's."""
    if not same_token(user.csrf, form.get("csrf")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form's security token is missing or stale; reload the page")
    return user


Poster = Annotated[SignedIn, Depends(posted)]


def admin(user: User) -> SignedIn:
    if user.key.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this page is for administrators")
    return user


def admin_post(user: Poster) -> SignedIn:
    return admin(user)


Admin = Annotated[SignedIn, Depends(admin)]
AdminPoster = Annotated[SignedIn, Depends(admin_post)]


def viewed(session, user: SignedIn, request: Request, **fields: Any) -> None:
    """Every page a person opens is in the audit log (action ``ui.view``, the path in ``detail``)."""
    record_event(session, action="ui.view", outcome="ok", key_id=user.key.id, detail=request.url.path, **fields)


def is_ui(request: Request) -> bool:
    return request.url.path == "/ui" or request.url.path.startswith("/ui/")


async def sign_in_required(request: Request, exc: Exception) -> Response:
    if request.url.path.endswith(("/status", ".png")) or request.method != "GET":
        return error_page(request, status.HTTP_401_UNAUTHORIZED, "Your session has ended; sign in again.")
    return see_other("/ui/sign-in")
