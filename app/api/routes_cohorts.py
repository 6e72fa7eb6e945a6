"""``/v1/cohorts``: asynchronous cohort jobs (create, poll, cancel)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response, status

from app.api.deps import CurrentKey, RegistryDep, SessionDep, SettingsDep
from app.api.schemas import CohortCreate, CohortStatus
from app.cohort_spec import check_covariates
from app.dataset_writer import FORMATS
from app.db import record_event
from app.jobs import create_job, job_status, samples_requested_today, visible_job

router = APIRouter(prefix="/v1/cohorts", tags=["cohorts"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CohortStatus,
    response_model_exclude_none=True,
    summary="Request a cohort",
)
def create_cohort(
    body: CohortCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    key: CurrentKey,
) -> object:
    model = registry.get(body.model)  # NotFound → 404 (app.errors)
    labels = model.card.labels
    unknown = sorted(set(body.counts) - set(labels))
    if unknown:
        raise HTTPException(422, f"unknown label(s) {unknown}; valid labels are {sorted(labels)}")
    if any(n < 1 for n in body.counts.values()):
        raise HTTPException(422, "every count must be a positive integer")
    check_covariates(body.covariates, body.counts, model.card.covariates)  # InvalidInput → 422 (app.errors)
    bad_formats = sorted(set(body.formats) - set(FORMATS))
    if bad_formats or "nifti" not in body.formats:
        raise HTTPException(422, f"formats must include nifti and come from {list(FORMATS)}")
    total = sum(body.counts.values())
    if (
        settings.dataset_storage_cap_gb
        and request.app.state.jobs.storage_used() >= settings.dataset_storage_cap_gb * 1e9
    ):
        record_event(session, action="cohort.create", outcome="refused: storage full", key_id=key.id, model=body.model)
        raise HTTPException(
            status.HTTP_507_INSUFFICIENT_STORAGE,
            "the service's dataset storage is full; try again once old datasets have expired",
            headers={"Retry-After": "3600"},
        )
    limit = settings.max_samples_per_request
    quota = key.quota_samples_per_day or settings.default_daily_quota
    used = samples_requested_today(session, key)
    refusal = None
    if total > limit:
        refusal = ("request too large", f"{total} samples requested; at most {limit} per request")
    elif used + total > quota:
        refusal = (
            "daily quota",
            f"daily quota exceeded: {used} of {quota} samples used in the last 24 h, {total} more requested",
        )
    if refusal is not None:
        record_event(
            session,
            action="cohort.create",
            outcome=f"refused: {refusal[0]}",
            key_id=key.id,
            model=body.model,
            counts=body.counts,
        )
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, refusal[1])
    job = create_job(
        session,
        key=key,
        model=body.model,
        counts=dict(body.counts),
        seed=body.seed,
        formats=list(body.formats),
        covariates=body.covariates_json(),
    )
    request.app.state.jobs.submit(job.id)
    response.headers["Location"] = f"/v1/cohorts/{job.id}"
    return job_status(job, key)


@router.get(
    "/{job_id}", response_model=CohortStatus, response_model_exclude_none=True, summary="Job status and progress"
)
def get_cohort(job_id: str, session: SessionDep, key: CurrentKey) -> object:
    job = visible_job(session, key, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no cohort job {job_id!r}")
    return job_status(job, key)


@router.delete("/{job_id}", response_model=CohortStatus, response_model_exclude_none=True, summary="Cancel a job")
def cancel_cohort(job_id: str, request: Request, session: SessionDep, key: CurrentKey) -> object:
    job = visible_job(session, key, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no cohort job {job_id!r}")
    if job.status in ("queued", "running"):
        request.app.state.jobs.cancel(job.id)
        record_event(session, action="cohort.cancel", outcome="requested", key_id=key.id, model=job.model)
    return job_status(job, key)
