"""``/v1/cohorts``: asynchronous cohort jobs (create, poll, cancel)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from app.api.deps import CurrentKey, RegistryDep, SessionDep, SettingsDep
from app.api.schemas import CohortStatus
from app.cohort_service import cancel_job, get_job, request_cohort
from app.cohort_spec import CohortCreate
from app.jobs import job_status

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
    # unknown model 404, bad labels/covariates/formats 422, over quota or size 429, storage full 507 (app.errors)
    job = request_cohort(
        session, spec=body, key=key, registry=registry, runner=request.app.state.jobs, settings=settings
    )
    response.headers["Location"] = f"/v1/cohorts/{job.id}"
    return job_status(job, key)


@router.get(
    "/{job_id}", response_model=CohortStatus, response_model_exclude_none=True, summary="Job status and progress"
)
def get_cohort(job_id: str, session: SessionDep, key: CurrentKey) -> object:
    return job_status(get_job(session, key, job_id), key)


@router.delete("/{job_id}", response_model=CohortStatus, response_model_exclude_none=True, summary="Cancel a job")
def cancel_cohort(job_id: str, request: Request, session: SessionDep, key: CurrentKey) -> object:
    job = cancel_job(session, key=key, runner=request.app.state.jobs, job_id=job_id)
    return job_status(job, key)
