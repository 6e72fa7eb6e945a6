"""``/ui``: the researcher's pages (sign-in, models, cohort requests, jobs, datasets). Each route reads the session,
calls the same service functions as the JSON API (:mod:`app.cohort_service`) and renders a template; no rule
lives here twice. Every action is audit-logged.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError

from app.api.deps import RegistryDep, SessionDep, SettingsDep
from app.api.routes_datasets import archive_response, file_response, safe_file
from app.cohort_service import (
    cancel_job,
    dataset_dir,
    dataset_documents,
    get_job,
    list_jobs,
    request_cohort,
)
from app.cohort_spec import CohortCreate
from app.dataset_writer import FORMATS
from app.db import record_event
from app.errors import InvalidField, Refused
from app.jobs import job_status
from app.keys import verify_key
from app.previews import label_grid, nifti_preview_png, preview_ready
from app.ui.deps import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    Form,
    Poster,
    User,
    render,
    see_other,
    viewed,
)
from app.ui.sessions import SignedIn, close_session, find_session, open_session, same_token
from generators.errors import InvalidInput, NotFound

log = logging.getLogger("synthcohort.ui")
router = APIRouter(prefix="/ui", include_in_schema=False)
ACTIVE = ("queued", "running")


# ------------------------------------------------------------------------------------------------ sign-in
@router.get("")
@router.get("/")
def home(request: Request, session: SessionDep) -> RedirectResponse:
    signed = find_session(session, request.cookies.get(SESSION_COOKIE)) is not None
    return see_other("/ui/models" if signed else "/ui/sign-in")


@router.get("/sign-in")
def sign_in_form(request: Request) -> Response:
    token = request.cookies.get(SIGN_IN_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", None, sign_in_token=token, error=None)
    _set_cookie(request, response, SIGN_IN_COOKIE, token, max_age=3600)
    return response


@router.post("/sign-in")
def sign_in(request: Request, session: SessionDep, settings: SettingsDep, form: Form) -> Response:
    if not same_token(request.cookies.get(SIGN_IN_COOKIE), form.get("csrf")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the sign-in form's security token is missing; reload the page")
    key = verify_key(session, form.get("api_key", "").strip())
    if key is None:
        wait = request.app.state.sign_in_limiter.wait_seconds(request.client.host if request.client else "")
        if wait:  # keys cannot be guessed, but each refusal is an audit-log row: bounded per client address
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS, "too many failed sign-ins; wait a minute", {"Retry-After": str(wait)}
            )
        record_event(session, action="ui.sign-in", outcome="refused: invalid key")
        return render(
            request,
            "sign_in.html",
            None,
            status_code=status.HTTP_401_UNAUTHORIZED,
            sign_in_token=request.cookies.get(SIGN_IN_COOKIE),
            error="That key is not valid: mistyped, revoked or expired.",
        )
    token = open_session(session, key, hours=settings.ui_session_hours)
    record_event(session, action="ui.sign-in", outcome="ok", key_id=key.id)
    response = see_other("/ui/models")
    _set_cookie(request, response, SESSION_COOKIE, token, max_age=int(settings.ui_session_hours * 3600))
    response.delete_cookie(SIGN_IN_COOKIE, path="/ui")
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or request.app.state.settings.environment != "development",
    )


@router.post("/sign-out")
def sign_out(request: Request, session: SessionDep, user: Poster) -> RedirectResponse:
    close_session(session, request.cookies.get(SESSION_COOKIE))
    record_event(session, action="ui.sign-out", outcome="ok", key_id=user.key.id)
    response = see_other("/ui/sign-in")
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


# ------------------------------------------------------------------------------------------------ models
@router.get("/models")
def models_page(request: Request, session: SessionDep, registry: RegistryDep, user: User) -> Response:
    viewed(session, user, request)
    data_dir = request.app.state.settings.data_dir
    models = [{**model.public(), "preview": preview_ready(model, data_dir)} for model in registry.models.values()]
    return render(request, "models.html", user, models=models)


@router.get("/models/{model_id}/preview/{label}.png")
def model_preview(
    model_id: str, label: str, request: Request, registry: RegistryDep, settings: SettingsDep, user: User
) -> FileResponse:
    model = registry.get(model_id)
    if label not in model.card.labels:
        raise NotFound(f"model {model_id!r} has no label {label!r}")
    grid = label_grid(model, label, settings.data_dir)
    if grid is None:  # a worker makes it (it needs the model's filter, which an API process does not hold)
        raise NotFound("no preview yet")
    return FileResponse(grid, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# ------------------------------------------------------------------------------------------------ request a cohort
def _request_form(request: Request, user: SignedIn, model, *, values: dict, errors: dict, status_code: int = 200):
    public = model.public()
    return render(
        request,
        "request.html",
        user,
        status_code=status_code,
        model=public,
        labels=sorted(public["labels"], key=public["labels"].get),
        formats=FORMATS,
        values=values,
        errors=errors,
    )


@router.get("/models/{model_id}/request")
def request_page(model_id: str, request: Request, session: SessionDep, registry: RegistryDep, user: User) -> Response:
    model = registry.get(model_id)
    viewed(session, user, request, model=model_id)
    return _request_form(request, user, model, values={"seed": "0", "format-nifti": "on"}, errors={})


@router.post("/models/{model_id}/request")
def request_post(
    model_id: str,
    request: Request,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    user: Poster,
    form: Form,
) -> Response:
    model = registry.get(model_id)
    labels = sorted(model.card.labels, key=model.card.labels.get)
    errors: dict[str, str] = {}
    spec = _spec_from_form(model_id, labels, form, errors)
    if spec is not None:
        try:
            job = request_cohort(
                session, spec=spec, key=user.key, registry=registry, runner=request.app.state.jobs, settings=settings
            )
            return see_other(f"/ui/jobs/{job.id}")
        except InvalidField as error:
            errors[error.field] = str(error)
        except Refused as error:
            errors["form"] = str(error)
    return _request_form(request, user, model, values=form, errors=errors, status_code=422)


def _spec_from_form(model_id: str, labels: list[str], form: dict[str, str], errors: dict[str, str]):
    """The form's fields as a :class:`CohortCreate` (the API's own schema and rules), or ``None`` with the
    problems in ``errors`` keyed by field (``counts.<label>``, ``covariates.<label>``, ``seed``, ``formats``)."""
    counts: dict[str, str] = {}
    covariates: dict[str, dict] = {}
    for i, label in enumerate(labels):
        raw = form.get(f"count-{i}", "").strip()
        if raw not in ("", "0"):
            counts[label] = raw
        targets = _covariates_from_form(form, i, label, errors)
        if targets:
            covariates[label] = targets
    data = {
        "model": model_id,
        "counts": counts,
        "covariates": covariates,
        "seed": form.get("seed", "").strip() or "0",
        "formats": [name for name in FORMATS if form.get(f"format-{name}")],
    }
    if errors:
        return None
    try:
        return CohortCreate.model_validate(data)
    except ValidationError as error:
        for problem in error.errors():
            loc = [str(part) for part in problem["loc"]]
            field = ".".join(loc[:2]) if loc[0] in ("counts", "covariates") and len(loc) > 1 else loc[0]
            errors.setdefault(field, problem["msg"].removeprefix("Value error, "))
        return None


def _covariates_from_form(form: dict[str, str], i: int, label: str, errors: dict[str, str]) -> dict:
    """Age range and share of women for one label, as the API's JSON (only what was filled in)."""
    targets: dict[str, Any] = {}
    low, high = form.get(f"age-min-{i}", "").strip(), form.get(f"age-max-{i}", "").strip()
    female = form.get(f"female-{i}", "").strip()
    try:
        if low or high:
            targets["age"] = {"min": int(low or high), "max": int(high or low)}
        if female:
            share = float(female)
            targets["sex"] = {"F": share, "M": 1.0 - share}
    except ValueError:
        errors[f"covariates.{label}"] = "ages are whole years and the share of women a number from 0 to 1"
    return targets


# ------------------------------------------------------------------------------------------------ jobs
@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, user: User) -> Response:
    viewed(session, user, request)
    jobs = [job_status(job, user.key) | {"created_at": job.created_at} for job in list_jobs(session, user.key)]
    return render(request, "jobs.html", user, jobs=jobs, active=ACTIVE)


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, user: User) -> Response:
    job = get_job(session, user.key, job_id)
    viewed(session, user, request, model=job.model)
    return render(request, "job.html", user, job=job_status(job, user.key), active=ACTIVE)


@router.get("/jobs/{job_id}/status")
def job_status_json(job_id: str, session: SessionDep, user: User) -> JSONResponse:
    """The live-progress script's poll: the same status object as ``GET /v1/cohorts/{id}``."""
    status_ = job_status(get_job(session, user.key, job_id), user.key)
    return JSONResponse(status_, headers={"Cache-Control": "no-store"})


@router.post("/jobs/{job_id}/cancel")
def job_cancel(job_id: str, request: Request, session: SessionDep, user: Poster) -> RedirectResponse:
    cancel_job(session, key=user.key, runner=request.app.state.jobs, job_id=job_id)
    return see_other(f"/ui/jobs/{job_id}")


# ------------------------------------------------------------------------------------------------ datasets
def _dataset(request: Request, session, user: SignedIn, dataset_id: str) -> Path:
    return dataset_dir(session, key=user.key, runner=request.app.state.jobs, dataset_id=dataset_id)


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str, request: Request, session: SessionDep, user: User) -> Response:
    root = _dataset(request, session, user, dataset_id)
    documents = dataset_documents(root)
    record_event(session, action="dataset.view", outcome="ok", key_id=user.key.id, dataset_id=dataset_id)
    samples = documents["manifest"]["samples"]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    shown: dict[str, list[dict]] = {}
    for sample in samples:
        if len(shown.setdefault(sample["label"], [])) < 8:
            shown[sample["label"]].append(sample)
    return render(
        request,
        "dataset.html",
        user,
        dataset_id=dataset_id,
        dataset=documents["manifest"]["dataset"],
        report=documents["privacy_report"],
        shown=shown,
        files=files,
    )


@router.get("/datasets/{dataset_id}/preview/{name:path}")
def dataset_preview(dataset_id: str, name: str, request: Request, session: SessionDep, user: User) -> Response:
    root = _dataset(request, session, user, dataset_id)
    if not name.endswith(".nii.gz"):
        raise InvalidInput("previews are made from the dataset's NIfTI files")
    return Response(nifti_preview_png(safe_file(root, name)), media_type="image/png")


@router.get("/datasets/{dataset_id}/files/{name:path}")
def dataset_file(dataset_id: str, name: str, request: Request, session: SessionDep, user: User) -> FileResponse:
    path = safe_file(_dataset(request, session, user, dataset_id), name)
    record_event(
        session, action="dataset.download", outcome="ok", key_id=user.key.id, dataset_id=dataset_id, detail=name
    )
    return file_response(path, filename=path.name)


@router.get("/datasets/{dataset_id}/archive")
def dataset_archive(dataset_id: str, request: Request, session: SessionDep, user: User) -> StreamingResponse:
    root = _dataset(request, session, user, dataset_id)
    record_event(
        session, action="dataset.download", outcome="ok", key_id=user.key.id, dataset_id=dataset_id, detail="archive"
    )
    return archive_response(root)
