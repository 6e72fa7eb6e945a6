"""What a researcher can do with cohorts, as plain functions: request one, list and cancel jobs, find a finished
dataset. The JSON routes (``app.api``) and the web pages (``app.ui``) both call these, so the rules live once.
No HTTP in here: refusals are domain errors that :mod:`app.errors` maps to statuses.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.cohort_spec import CohortCreate, check_covariates
from app.dataset_writer import FORMATS
from app.db import ApiKey, Job, record_event
from app.errors import Gone, InvalidField, Refused, StorageFull
from app.jobs import JobRunner, create_job, visible_job
from app.model_registry import ModelRegistry
from app.settings import Settings
from generators.errors import InvalidInput, NotFound

STORAGE_RETRY_SECONDS = 3600


def request_cohort(
    session: Session,
    *,
    spec: CohortCreate,
    key: ApiKey,
    registry: ModelRegistry,
    runner: JobRunner,
    settings: Settings,
) -> Job:
    """Check a cohort request against the model, the storage cap and the key's limits, then queue it.

    Raises:
        NotFound: no such model.
        InvalidField: an unknown label, a count below 1, covariates the model cannot honour, bad formats.
        StorageFull: the dataset storage is over its cap.
        Refused: the request is larger than one request may be, or over the key's daily quota (checked and
            charged atomically: :func:`app.jobs.create_job`).
    """
    model = registry.get(spec.model)
    _check_against_model(spec, model.card.labels, model.card.covariates)
    total = sum(spec.counts.values())
    if settings.dataset_storage_cap_gb and runner.storage_used() >= settings.dataset_storage_cap_gb * 1e9:
        record_event(session, action="cohort.create", outcome="refused: storage full", key_id=key.id, model=spec.model)
        raise StorageFull(
            "the service's dataset storage is full; try again once old datasets have expired",
            retry_after=STORAGE_RETRY_SECONDS,
        )
    _check_size(session, spec, key, settings, total)
    try:
        job = create_job(
            session,
            key=key,
            quota=key.quota_samples_per_day or settings.default_daily_quota,
            model=spec.model,
            counts=dict(spec.counts),
            seed=spec.seed,
            formats=list(spec.formats),
            covariates=spec.covariates_json(),
        )
    except Refused:
        _record_refusal(session, "daily quota", spec, key)
        raise
    runner.submit(job.id)
    return job


def _check_against_model(spec: CohortCreate, labels: dict[str, int], declared: dict | None) -> None:
    unknown = sorted(set(spec.counts) - set(labels))
    if unknown:
        raise InvalidField(f"unknown label(s) {unknown}; valid labels are {sorted(labels)}", field="counts")
    if any(n < 1 for n in spec.counts.values()):
        raise InvalidField("every count must be a positive integer", field="counts")
    try:
        check_covariates(spec.covariates, spec.counts, declared)
    except InvalidInput as error:
        raise InvalidField(str(error), field="covariates") from None
    if set(spec.formats) - set(FORMATS) or "nifti" not in spec.formats:
        raise InvalidField(f"formats must include nifti and come from {list(FORMATS)}", field="formats")


def _check_size(session: Session, spec: CohortCreate, key: ApiKey, settings: Settings, total: int) -> None:
    limit = settings.max_samples_per_request
    if total > limit:
        _record_refusal(session, "request too large", spec, key)
        raise Refused(f"{total} samples requested; at most {limit} per request")


def _record_refusal(session: Session, reason: str, spec: CohortCreate, key: ApiKey) -> None:
    record_event(
        session,
        action="cohort.create",
        outcome=f"refused: {reason}",
        key_id=key.id,
        model=spec.model,
        counts=dict(spec.counts),
    )


def get_job(session: Session, key: ApiKey, job_id: str) -> Job:
    """A job this key may see (its own; an admin sees all).

    Raises:
        NotFound: no such job, or another researcher's.
    """
    job = visible_job(session, key, job_id)
    if job is None:
        raise NotFound(f"no cohort job {job_id!r}")
    return job


def cancel_job(session: Session, *, key: ApiKey, runner: JobRunner, job_id: str) -> Job:
    """Ask for a queued or running job to stop (a finished one is left as it is)."""
    job = get_job(session, key, job_id)
    if job.status in ("queued", "running"):
        runner.cancel(job.id)
        record_event(session, action="cohort.cancel", outcome="requested", key_id=key.id, model=job.model)
        session.refresh(job)
    return job


def list_jobs(session: Session, key: ApiKey, *, limit: int = 100) -> list[Job]:
    """Newest first: a researcher's own jobs; every job for an admin."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if key.role != "admin":
        query = query.where(Job.key_id == key.id)
    return list(session.scalars(query))


def dataset_dir(session: Session, *, key: ApiKey, runner: JobRunner, dataset_id: str) -> Path:
    """The directory of a finished dataset this key may read.

    Raises:
        Gone: it expired and was deleted.
        NotFound: no such dataset, not finished, or another researcher's.
    """
    job = visible_job(session, key, dataset_id)
    root = runner.datasets / dataset_id
    if job is not None and job.status == "expired":
        raise Gone(f"dataset {dataset_id!r} expired and was deleted")
    if job is None or job.status != "succeeded" or not root.is_dir():
        raise NotFound(f"no dataset {dataset_id!r}")
    return root


def dataset_documents(root: Path) -> dict:
    """A finished dataset's manifest and privacy report."""
    return {
        "manifest": json.loads((root / "manifest.json").read_text()),
        "privacy_report": json.loads((root / "privacy_report.json").read_text()),
    }
