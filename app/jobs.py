"""Cohort jobs for the REST service: persisted in the database, run on a bounded pool with the one
pipeline (:func:`app.pipeline.build_cohort`). No HTTP in here.

Datasets live in ``DATA_DIR/datasets/<job id>/`` and appear only when complete (the pipeline renames them
into place). On start-up, jobs left ``queued`` or ``running`` by a stopped server are resumed from their
finished shards.

What a researcher sees of a job is its progress ("n of N done") and a public error sentence; the filter's
totals (generated, rejected) and the full error text are for admins and the audit log only.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.api.metrics import GENERATED, JOBS, REJECTED, SAMPLES
from app.api.registry import ModelRegistry
from app.db import ApiKey, Job, record_event, utcnow
from app.errors import public_job_error
from app.pipeline import CohortProgress, CohortRequest, build_cohort, partial_dir
from generators.errors import SynthCohortError

ACTIVE = ("queued", "running")
log = logging.getLogger("synthcohort.jobs")


class JobRunner:
    """A bounded pool running cohort jobs; cancellation is cooperative (checked after every shard)."""

    def __init__(self, sessions: sessionmaker[Session], registry: ModelRegistry, datasets: Path, workers: int) -> None:
        self.sessions, self.registry, self.datasets = sessions, registry, Path(datasets)
        self.datasets.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cohort-job")
        self._cancel: dict[str, threading.Event] = {}

    def recover(self) -> int:
        """Resubmit jobs a previous server left unfinished; returns how many."""
        with self.sessions() as session:
            ids = list(session.scalars(select(Job.id).where(Job.status.in_(ACTIVE)).order_by(Job.created_at)))
        for job_id in ids:
            self.submit(job_id, resume=True)
        return len(ids)

    def submit(self, job_id: str, *, resume: bool = False) -> None:
        self._cancel[job_id] = threading.Event()
        self.pool.submit(self._run, job_id, resume)

    def cancel(self, job_id: str) -> None:
        event = self._cancel.get(job_id)
        if event is not None:
            event.set()

    def shutdown(self) -> None:
        for event in self._cancel.values():
            event.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _update(self, job_id: str, **fields: object) -> None:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            for name, value in fields.items():
                setattr(job, name, value)
            job.updated_at = utcnow()
            session.commit()

    def _run(self, job_id: str, resume: bool) -> None:
        cancelled = self._cancel[job_id]
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in ACTIVE:
                return
            model_id, counts, seed, formats, key_id = (
                job.model,
                dict(job.counts),
                job.seed,
                tuple(job.formats),
                job.key_id,
            )
        out = self.datasets / job_id
        if cancelled.is_set():
            self._finish(job_id, key_id, model_id, counts, "cancelled", None)
            return
        self._update(job_id, status="running")
        total = sum(counts.values())

        last = {"generated": 0, "rejected": 0, "accepted": 0}

        def on_progress(state: CohortProgress) -> None:
            GENERATED.inc(max(0, state.generated - last["generated"]))
            REJECTED.inc(max(0, state.rejected - last["rejected"]))
            SAMPLES.inc(max(0, state.accepted - last["accepted"]))
            last.update(generated=state.generated, rejected=state.rejected, accepted=state.accepted)
            self._update(
                job_id,
                progress=state.accepted / total,
                generated=state.generated,
                rejected=state.rejected,
                accepted=state.accepted,
            )

        try:
            model = self.registry.get(model_id)
            request = CohortRequest(
                counts=counts, seed=seed, formats=formats, allow_not_private=self.registry.allow_not_private
            )
            build_cohort(
                model.path,
                request,
                out,
                resume=resume or partial_dir(out).exists(),
                device="auto",
                progress=on_progress,
                cancelled=cancelled.is_set,
            )
        except Exception as error:  # a bug must not leave the job "running" forever either
            if cancelled.is_set() and isinstance(error, SynthCohortError):
                self._finish(job_id, key_id, model_id, counts, "cancelled", None)
            else:
                log.error("cohort job %s failed", job_id, exc_info=error)
                self._finish(job_id, key_id, model_id, counts, "failed", error)
            return
        self._finish(job_id, key_id, model_id, counts, "succeeded", None, dataset_id=job_id)

    def _finish(self, job_id, key_id, model_id, counts, status, error: BaseException | None, dataset_id=None) -> None:
        if status != "succeeded":
            shutil.rmtree(partial_dir(self.datasets / job_id), ignore_errors=True)
        JOBS.labels(status).inc()
        fields = {"status": status, "error": public_job_error(error) if error else None, "dataset_id": dataset_id}
        if status == "succeeded":
            fields["progress"] = 1.0
        self._update(job_id, **fields)
        detail = None
        if error is not None:  # the full text, for admins only
            detail = f"{type(error).__name__}: {error}" + (f" ({error.detail})" if getattr(error, "detail", "") else "")
        with self.sessions() as session:
            record_event(
                session,
                action="cohort.finish",
                outcome=status,
                key_id=key_id,
                model=model_id,
                counts=counts,
                dataset_id=dataset_id,
                detail=detail,
            )


def create_job(
    session: Session, *, key: ApiKey, model: str, counts: dict[str, int], seed: int, formats: list[str]
) -> Job:
    job = Job(id=uuid.uuid4().hex, key_id=key.id, model=model, counts=counts, seed=seed, formats=formats)
    session.add(job)
    session.commit()
    record_event(session, action="cohort.create", outcome="queued", key_id=key.id, model=model, counts=counts)
    return job


def samples_requested_today(session: Session, key: ApiKey) -> int:
    """Samples this key asked for in the last 24 h: every job counts, failed and cancelled ones included
    (a failed or cancelled job still ran the filter on the key's behalf)."""
    since = utcnow() - timedelta(days=1)
    jobs = session.scalars(select(Job).where(Job.key_id == key.id, Job.created_at >= since))
    return sum(sum(job.counts.values()) for job in jobs)


def job_status(job: Job, key: ApiKey) -> dict:
    """A job as its viewer may see it: researchers get progress only; admins also the filter's totals."""
    total = sum(job.counts.values())
    status = {
        "id": job.id,
        "model": job.model,
        "counts": job.counts,
        "seed": job.seed,
        "status": job.status,
        "progress": job.progress,
        "done": job.accepted,
        "total": total,
        "error": job.error,
        "dataset_id": job.dataset_id,
    }
    if key.role == "admin":
        status.update(generated=job.generated, rejected=job.rejected)
    return status


def visible_job(session: Session, key: ApiKey, job_id: str) -> Job | None:
    """The job if this key may see it (its owner, or an admin)."""
    job = session.get(Job, job_id)
    if job is None or (key.role != "admin" and job.key_id != key.id):
        return None
    return job
