"""Cohort jobs for the REST service: persisted in the database, claimed by workers under a lease, run with the
one pipeline (:func:`app.pipeline.build_cohort`). No HTTP in here.

Any number of processes may run jobs against one database and one shared dataset directory: the embedded
``serve`` (API and jobs in one process, the default), ``serve --no-worker`` (API only) and ``worker`` (jobs only).
A worker claims a job with a compare-and-set on its lease (``lease_owner``, ``lease_expires_at``), renews the lease
while it runs, and gives it back when it stops; a job whose worker died (its lease ran out) is claimed by another
worker and resumed from its finished shards. So a job runs in one process at a time, and exactly once to the end.
A cancel is a flag in the database that the running worker reads within a second.

Datasets live in ``DATA_DIR/datasets/<job id>/`` and appear only when complete (the pipeline renames them
into place).

What a researcher sees of a job is its progress ("n of N done") and a public error sentence; the filter's
totals (generated, rejected) and the full error text are for admins and the audit log only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import ApiKey, Job, as_utc, record_event, session_factory, utcnow
from app.errors import Refused, public_job_error
from app.export_destination import partial_dir
from app.metrics import GENERATED, JOBS, REJECTED, SAMPLES
from app.model_registry import ModelRegistry
from app.pipeline import CohortProgress, CohortRequest, build_cohort
from app.previews import make_preview
from app.settings import Settings
from generators.errors import SynthCohortError

ACTIVE = ("queued", "running")
log = logging.getLogger("synthcohort.jobs")


class JobRunner:
    """``workers`` threads that claim and run cohort jobs (none: an API-only process that only records them).

    Cancellation is cooperative (checked after every shard); stopping the runner gives running jobs back (their
    leases are released, their shards kept) instead of cancelling them.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: ModelRegistry,
        data_dir: Path,
        workers: int,
        *,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        dataset_ttl_days: float | None = None,
    ) -> None:
        self.sessions, self.registry, self.data_dir = sessions, registry, Path(data_dir)
        self.datasets = self.data_dir / "datasets"
        self.datasets.mkdir(parents=True, exist_ok=True)
        self.workers, self.lease, self.poll = workers, timedelta(seconds=lease_seconds), poll_seconds
        self.ttl = timedelta(days=dataset_ttl_days) if dataset_ttl_days else None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping, self._wake = threading.Event(), threading.Event()
        self._running: dict[str, threading.Event] = {}  # job id -> "stop this job" (cancel, lost lease, shutdown)
        self._previewing: set[threading.Thread] = set()  # workers making a preview: not waited for at shutdown
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._usage = (-1e9, 0)  # (when measured, bytes)

    def start(self) -> None:
        """Start the worker threads and the lease keeper (no-op for an API-only runner)."""
        if self.workers < 1 or self._threads:
            return
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._work, name=f"cohort-job-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._keep_leases, name="cohort-leases", daemon=True))
        for thread in self._threads:
            thread.start()

    def storage_used(self) -> int:
        """Bytes under the dataset directory (finished and unfinished datasets), measured at most every 10 s."""
        now = time.monotonic()
        if now - self._usage[0] > 10.0:
            total = 0
            for folder, _, files in os.walk(self.datasets):
                for name in files:
                    with contextlib.suppress(OSError):  # a file renamed or deleted while we walk
                        total += os.lstat(os.path.join(folder, name)).st_size
            self._usage = (now, total)
        return self._usage[1]

    def submit(self, job_id: str) -> None:
        """A new job was recorded: wake an idle worker of this process (other processes poll)."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Ask whichever worker runs the job to cancel it (a queued job is cancelled when it is next claimed)."""
        with self.sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            session.commit()
        with self._lock:
            event = self._running.get(job_id)
        if event is not None:
            event.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._lock:
            for event in self._running.values():
                event.set()
        with self._lock:
            previewing = set(self._previewing)
        for thread in self._threads:
            if thread not in previewing:  # a preview is resumable and holds no job: the process need not wait for it
                thread.join(timeout=120)

    # ---------------------------------------------------------------------------------- claiming and leases
    def _work(self) -> None:
        while not self._stopping.is_set():
            job_id = None
            try:
                job_id = self._claim()
                if job_id is not None:
                    self._run(job_id)
            except Exception:  # the database went away: the lease runs out and the job is resumed later
                log.warning("job worker: database error%s", f" during job {job_id}" if job_id else "", exc_info=True)
                self._stopping.wait(self.poll)
            finally:
                if job_id is not None:
                    with self._lock:
                        self._running.pop(job_id, None)
            if job_id is None and not self._make_a_preview():
                self._wake.wait(self.poll)
                self._wake.clear()

    def _make_a_preview(self) -> bool:
        """Idle: make one missing model preview (the web pages show only finished ones); ``True`` if one was made."""
        me = threading.current_thread()
        with self._lock:
            self._previewing.add(me)
        try:
            for model in self.registry.models.values():
                if self._stopping.is_set():
                    return False
                try:
                    if make_preview(model, self.data_dir, allow_not_private=self.registry.allow_not_private):
                        return True
                except Exception:  # a model that cannot make one (e.g. a memorizing model) must not stop the jobs
                    log.warning("could not make the preview of model %s", model.id, exc_info=True)
            return False
        finally:
            with self._lock:
                self._previewing.discard(me)

    def _claim(self) -> str | None:
        """The oldest active job nobody holds (or whose holder's lease ran out), now held by this process."""
        now = utcnow()
        free = Job.status.in_(ACTIVE) & or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
        with self.sessions() as session:
            for job_id in session.scalars(select(Job.id).where(free).order_by(Job.created_at).limit(16)):
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, free)
                    .values(lease_owner=self.owner, lease_expires_at=now + self.lease)
                )
                session.commit()
                if claimed.rowcount == 1:
                    with self._lock:
                        self._running[job_id] = threading.Event()
                    return job_id
        return None

    def _keep_leases(self) -> None:
        """Renew this process's leases; stop a job whose lease was lost or whose cancel was asked for."""
        interval = min(1.0, self.lease.total_seconds() / 3)
        sweep_every = min(60.0, self.ttl.total_seconds() / 4) if self.ttl else None
        last_sweep = 0.0
        while not self._stopping.wait(interval):
            if sweep_every and time.monotonic() - last_sweep >= sweep_every:
                last_sweep = time.monotonic()
                try:
                    self._expire_datasets()
                except Exception:
                    log.warning("could not expire old datasets", exc_info=True)
            with self._lock:
                mine = dict(self._running)
            if not mine:
                continue
            try:
                with self.sessions() as session:
                    for job_id, stop in mine.items():
                        renewed = session.execute(
                            update(Job)
                            .where(Job.id == job_id, Job.lease_owner == self.owner)
                            .values(lease_expires_at=utcnow() + self.lease)
                        )
                        if renewed.rowcount != 1 or session.get(Job, job_id).cancel_requested:
                            stop.set()
                    session.commit()
            except Exception:  # the database is away for a moment: keep running, renew next time
                log.warning("could not renew job leases", exc_info=True)

    def _expire_datasets(self) -> None:
        """Delete datasets finished longer than the retention period ago: the job says ``expired`` first (its
        downloads answer 410), then the files go, and the audit log records it."""
        cutoff = utcnow() - self.ttl
        with self.sessions() as session:
            old = list(session.scalars(select(Job).where(Job.status == "succeeded", Job.updated_at < cutoff)))
            for job in old:
                expired = session.execute(
                    update(Job).where(Job.id == job.id, Job.status == "succeeded").values(status="expired")
                )
                session.commit()
                if expired.rowcount == 1:  # this process won the race to expire it
                    shutil.rmtree(self.datasets / job.id, ignore_errors=True)
                    record_event(
                        session, action="dataset.expire", outcome="deleted", key_id=job.key_id, dataset_id=job.id
                    )

    def _update(self, job_id: str, **fields: object) -> bool:
        """Write fields of a job this process holds; ``False`` if it no longer holds it."""
        with self.sessions() as session:
            done = session.execute(
                update(Job).where(Job.id == job_id, Job.lease_owner == self.owner).values(**fields, updated_at=utcnow())
            )
            session.commit()
            return done.rowcount == 1

    # --------------------------------------------------------------------------------------------- running
    def _run(self, job_id: str) -> None:
        with self._lock:
            stop = self._running[job_id]
        with self.sessions() as session:
            job = session.get(Job, job_id)
            model_id, counts, seed, formats, key_id, covariates, created_at = (
                job.model,
                dict(job.counts),
                job.seed,
                tuple(job.formats),
                job.key_id,
                dict(job.covariates or {}),
                job.created_at,
            )
            cancel_requested = job.cancel_requested
        out = self.datasets / job_id
        if cancel_requested:
            self._finish(job_id, key_id, model_id, counts, "cancelled", None)
            return
        if not self._update(job_id, status="running"):
            return
        total = sum(counts.values())

        last = {"generated": 0, "rejected": 0, "accepted": 0}

        def on_progress(state: CohortProgress) -> None:
            GENERATED.inc(max(0, state.generated - last["generated"]))
            REJECTED.inc(max(0, state.rejected - last["rejected"]))
            SAMPLES.inc(max(0, state.accepted - last["accepted"]))
            last.update(generated=state.generated, rejected=state.rejected, accepted=state.accepted)
            held = self._update(  # researchers see shards done (fixed work each), admins also the filter's totals
                job_id,
                progress=state.done / total,
                generated=state.generated,
                rejected=state.rejected,
                accepted=state.done,
            )
            if not held:
                stop.set()

        try:
            model = self.registry.get(model_id)
            request = CohortRequest(
                counts=counts,
                seed=seed,
                formats=formats,
                covariates=covariates,
                allow_not_private=self.registry.allow_not_private,
                released_at=as_utc(created_at).isoformat(timespec="seconds"),  # every file carries the job's time
            )
            build_cohort(
                model.path,
                request,
                out,
                resume=partial_dir(out).exists(),
                device="auto",
                progress=on_progress,
                cancelled=stop.is_set,
            )
        except Exception as error:  # a bug must not leave the job "running" forever either
            if stop.is_set() and isinstance(error, SynthCohortError):
                self._stopped(job_id, key_id, model_id, counts)
            else:
                log.error("cohort job %s failed", job_id, exc_info=error)
                self._finish(job_id, key_id, model_id, counts, "failed", error)
            return
        self._finish(job_id, key_id, model_id, counts, "succeeded", None, dataset_id=job_id)

    def _stopped(self, job_id: str, key_id: int, model_id: str, counts: dict) -> None:
        """The job stopped early: cancelled if its owner asked, else given back (shutdown, lost lease)."""
        with self.sessions() as session:
            cancel_requested = session.get(Job, job_id).cancel_requested
        if cancel_requested:
            self._finish(job_id, key_id, model_id, counts, "cancelled", None)
        else:  # shards stay on disk; whoever claims it next resumes from them
            self._update(job_id, lease_owner=None, lease_expires_at=None)

    def _finish(self, job_id, key_id, model_id, counts, status, error: BaseException | None, dataset_id=None) -> None:
        fields = {"status": status, "error": public_job_error(error) if error else None, "dataset_id": dataset_id}
        if status == "succeeded":
            fields["progress"] = 1.0
        if status != "succeeded":  # its leftovers go first, so a job that reads cancelled or failed has none
            if not self._update(job_id):
                return  # another worker holds it now: the partial dataset and the outcome are its own
            shutil.rmtree(partial_dir(self.datasets / job_id), ignore_errors=True)
        if not self._update(job_id, **fields, lease_owner=None, lease_expires_at=None):
            return  # another worker holds it now: the outcome is its to record
        JOBS.labels(status).inc()
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


def job_runner(settings: Settings, registry: ModelRegistry, *, workers: int) -> JobRunner:
    """The runner the settings describe (database, dataset directory, lease and polling)."""
    return JobRunner(
        session_factory(settings),
        registry,
        Path(settings.data_dir),
        workers,
        lease_seconds=settings.job_lease_seconds,
        poll_seconds=settings.job_poll_seconds,
        dataset_ttl_days=settings.dataset_ttl_days,
    )


def create_job(
    session: Session,
    *,
    key: ApiKey,
    quota: int,
    model: str,
    counts: dict[str, int],
    seed: int,
    formats: list[str],
    covariates: dict[str, dict] | None = None,
) -> Job:
    """Queue a job when the key's daily quota still fits it: the check and the insert are one transaction that
    first updates the key's row, so concurrent requests of one key are charged one at a time (a row lock on
    PostgreSQL, the database's write lock on SQLite) and never all pass a check that only one of them fits.

    Raises:
        Refused: the key's requests of the last 24 h plus this one exceed ``quota``.
    """
    total = sum(counts.values())
    session.commit()  # end any read transaction, so the update below starts a fresh one (SQLite: takes the lock)
    session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_request_at=utcnow()))
    used = samples_requested_today(session, key)
    if used + total > quota:
        session.rollback()
        raise Refused(f"daily quota exceeded: {used} of {quota} samples used in the last 24 h, {total} more requested")
    job = Job(
        id=uuid.uuid4().hex,
        key_id=key.id,
        model=model,
        counts=counts,
        seed=seed,
        formats=formats,
        covariates=covariates or None,
    )
    session.add(job)
    session.commit()
    record_event(session, action="cohort.create", outcome="queued", key_id=key.id, model=model, counts=counts)
    return job


def samples_requested_today(session: Session, key: ApiKey) -> int:
    """Samples this key asked for in the last 24 h: every job counts, failed and cancelled ones included
    (a failed or cancelled job still ran the filter on the key's behalf)."""
    since = utcnow() - timedelta(days=1)
    jobs = session.scalars(select(Job.counts).where(Job.key_id == key.id, Job.created_at >= since))
    return sum(sum(counts.values()) for counts in jobs)


def job_status(job: Job, key: ApiKey) -> dict:
    """A job as its viewer may see it: researchers get progress only; admins also the filter's totals."""
    total = sum(job.counts.values())
    status = {
        "id": job.id,
        "model": job.model,
        "counts": job.counts,
        "seed": job.seed,
        "covariates": job.covariates or None,
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
