"""The one cohort pipeline: generate → filter → write. The REST job and the bulk export both call
:func:`build_cohort`; only the front door (HTTP, CLI, Ray) differs.

The work is cut into deterministic shards of ``(label, sample index range)``. Sample ``i`` of a label first
uses seed ``sample_seed(key, seed, label, i, 0)``; if the memorization filter rejects it, its ``a``-th spare
draw uses ``sample_seed(key, seed, label, i, a)``, an HMAC keyed with the model's private seed key. Seeds depend
only on the request and the key, never on scheduling, so any worker count or backend produces the same dataset
and a resumed export redoes exactly the shards that had not finished. The operator (who holds the key) can
reproduce a cohort; nobody else can tell from a recorded seed whether an earlier draw was rejected.

The filter's decisions are outside ε, so nothing a researcher can observe follows them:
- a released dataset carries nothing beyond "passed the filter": no score, distance, attempt number or rejection
  count; those totals reach only the caller's ``progress`` callback (the operator's terminal, admins, the audit);
- every shard does the same work whatever the filter decides: its first draws, then a fixed number of spare
  rounds of a fixed size (:func:`draw_rounds`; spares nobody needs are generated, filtered and dropped), and its
  files are written in index order once every sample is decided, all stamped with one time
  (``request.released_at``: file times, DICOM dates) — so neither time nor order shows which sample was redrawn;
- a shard the filter fails releases nothing, and the export still runs every other shard before it reports the
  finding, so when it fails does not say where.

Everything happens in ``.<name>.partial`` next to the output; the final directory appears (by rename) only when
every shard is done.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.cohort_spec import check_counts, check_covariates, parse_covariates, rows_of
from app.dataset_writer import FORMATS, write_documents, write_json, write_sample
from app.export_destination import check_destination, partial_dir
from generators.atomic import publish_directory
from generators.base import Generator, resolve_device
from generators.errors import Conflict, InvalidInput, NotFound, PrivacyPolicy
from generators.layout import BundleLayout
from generators.registry import load_generator
from privacy_filters import MemorizationFilter

SHARD_SIZE = 64
SHARDS_DIR = ".shards"
REQUEST_FILE = "request.json"
SPARE_ROUNDS = 2  # rounds of spare draws after a shard's first draws
SPARE_FRACTION = 0.25  # spare draws per round, as a share of the shard's samples ...
MIN_SPARES = 4  # ... and at least this many


PLAIN_FAILURE = "the job could not be completed; the operator has been told"
MEMORIZATION_MESSAGE = (
    "the model appears to memorize: too many of its samples were closer to a training image than unseen patients "
    "are, so nothing was released. This is a finding about the model, not a crash: the operator should audit it "
    "(`synthcohort audit`) and retrain with a smaller epsilon."
)


class MemorizationSuspected(PrivacyPolicy):
    """Too many generated samples sit closer to training images than unseen patients do: a finding.

    ``str(error)`` says so without numbers (the operator's terminal); ``detail`` has the counts, for the operator and
    admins only; ``public_message`` is what a researcher reads: a plain failure, which says nothing about the filter.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message, detail)  # both in args, so the error survives pickling (process pools, Ray)
        self.detail = detail
        self.public_message = PLAIN_FAILURE  # researchers read a plain failure: not why, not where

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class CohortRequest:
    """What to generate. ``counts`` maps label → number of samples; ``covariates`` maps a label to its
    covariate targets (:class:`app.cohort_spec.CovariateTargets` as JSON)."""

    counts: dict[str, int]
    seed: int = 0
    covariates: dict[str, dict] = field(default_factory=dict)
    formats: tuple[str, ...] = ("nifti",)
    steps: int | None = None
    guidance: float | None = None
    shard_size: int = SHARD_SIZE
    spare_rounds: int = SPARE_ROUNDS
    spare_fraction: float = SPARE_FRACTION
    max_rejection_rate: float = 0.5
    allow_not_private: bool = False
    released_at: str | None = None  # ISO time every released file carries (None: when the export starts)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["formats"] = list(self.formats)
        return data


@dataclass(frozen=True)
class Shard:
    label: str
    index: int
    start: int  # first sample index (within the label)
    stop: int

    @property
    def name(self) -> str:
        return f"{self.label}-{self.index:05d}"


@dataclass
class ShardResult:
    shard: str
    samples: list[dict]
    generated: int
    rejected: int
    size: int = 0  # samples the shard was asked for (its share of the progress)
    finding: str = ""  # why the filter failed the shard (operator detail; the shard then released nothing)


@dataclass
class CohortProgress:
    """Running totals reported after every shard."""

    total: int
    done: int = 0  # samples of finished shards: what a researcher may see (it moves the same whatever is rejected)
    accepted: int = 0
    generated: int = 0
    rejected: int = 0
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)


def sample_seed(key: bytes, seed: int, label: str, index: int, attempt: int) -> int:
    """The recorded seed of a sample's ``attempt``-th try: 60 bits of HMAC-SHA256(key, request coordinates)."""
    digest = hmac.new(key, f"{seed}:{label}:{index}:{attempt}".encode(), hashlib.sha256).hexdigest()
    return int(digest[:15], 16)


def load_seed_key(model_dir: Path) -> bytes:
    path = BundleLayout(model_dir).seed_key
    if not path.is_file():
        raise NotFound(f"{model_dir} has no seed key; run `synthcohort calibrate STORE {model_dir}` first")
    return path.read_bytes()


def draw_rounds(n: int, spare_fraction: float = SPARE_FRACTION, spare_rounds: int = SPARE_ROUNDS) -> list[int]:
    """Draws per generation round of a shard of ``n`` samples: ``n`` first draws, then ``spare_rounds`` rounds of
    ``max(MIN_SPARES, ⌈n · spare_fraction⌉)`` spares. The plan depends on ``n`` alone, never on the filter."""
    spares = max(MIN_SPARES, math.ceil(n * spare_fraction))
    return [n, *[spares] * spare_rounds]


def plan_shards(counts: dict[str, int], shard_size: int) -> list[Shard]:
    return [
        Shard(label, j, start, min(start + shard_size, n))
        for label, n in counts.items()
        for j, start in enumerate(range(0, n, shard_size))
    ]


def validate_request(model: Generator, request: CohortRequest) -> None:
    """Clear errors for bad requests, before any work starts."""
    check_counts(request.counts, model.label_ids)
    bad = sorted(set(request.formats) - set(FORMATS))
    if bad or not request.formats:
        raise InvalidInput(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
    if "nifti" not in request.formats:
        raise InvalidInput("the nifti format is required (manifests point at the NIfTI files)")
    if not 1 <= request.shard_size <= 4096 or not 0 <= request.spare_rounds <= 10:
        raise InvalidInput("shard_size must be in 1..4096 and spare_rounds in 0..10")
    if not 0.0 <= request.spare_fraction <= 4.0:
        raise InvalidInput("spare_fraction must be in 0..4")
    if not 0.0 < request.max_rejection_rate <= 1.0:
        raise InvalidInput("max_rejection_rate must be in (0, 1]")
    check_covariates(parse_covariates(request.covariates), request.counts, model.card.covariates)


def sample_conditions(request: CohortRequest, label: str) -> dict[str, np.ndarray] | None:
    """Every sample's covariate values for ``label`` as arrays (``None``: the request gave no targets for it)."""
    targets = parse_covariates(request.covariates).get(label)
    return None if targets is None else targets.draw(label, request.counts[label], request.seed)


class CohortWorker:
    """Holds one model and its filter; runs shards. One per process / Ray actor."""

    def __init__(self, model_dir: str | Path, device: str = "auto", allow_not_private: bool = False) -> None:
        self.model_dir = Path(model_dir)
        layout = BundleLayout(self.model_dir)
        self.model = load_generator(self.model_dir, device=device)  # refuses cards of older formats
        self.card = self.model.card
        if not self.card.dp and not allow_not_private:
            raise PrivacyPolicy(
                "this model was trained WITHOUT differential privacy (dp: false); refusing to generate a cohort "
                "unless explicitly allowed (--allow-not-private); its outputs would be marked NOT PRIVATE"
            )
        if not (layout.filter_dir / "filter.json").is_file():
            raise NotFound(
                f"{self.model_dir} has no memorization filter; run `synthcohort calibrate STORE {self.model_dir}` first"
            )
        self.filter = MemorizationFilter.load(layout.filter_dir, device=resolve_device(device))  # where it samples
        self.calibration = json.loads(layout.calibration.read_text())
        self.seed_key = load_seed_key(self.model_dir)
        if self.calibration.get("store_id") != self.card.store_id:
            raise PrivacyPolicy(
                "the memorization filter was calibrated on a different cohort store than the model was trained on; "
                "re-run calibrate with the model's training store"
            )
        if self.filter.image_shape != self.model.image_shape:
            raise InvalidInput("the filter's image shape differs from the model's; re-run calibrate")
        self.model_id = f"{self.model_dir.name}@{self.card.training_inputs_digest[:12]}"
        self._drawn: dict[str, dict[str, np.ndarray] | None] = {}  # request + label → covariate values

    def _conditions(self, request: CohortRequest, label: str) -> dict[str, np.ndarray] | None:
        """:func:`sample_conditions`, drawn once per request and label (not once per shard)."""
        key = json.dumps([request.seed, label, request.counts[label], request.covariates.get(label)], sort_keys=True)
        if key not in self._drawn:
            self._drawn = {key: sample_conditions(request, label)}  # keep one: a worker runs one request at a time
        return self._drawn[key]

    def run_shard(self, shard: Shard, request: CohortRequest, root: Path) -> ShardResult:
        """Generate and filter one shard in its fixed rounds, then write its samples in index order.

        The work is the same whatever the filter decides (:func:`draw_rounds`), so a shard's duration carries no
        rejection count. A shard the filter fails still writes as many files (a sample without an accepted draw,
        its last one) and returns a ``finding`` (operator detail) and no manifest rows: the export then fails and
        its partial directory, files included, is deleted (:func:`build_cohort`).
        """
        span = range(shard.start, shard.stop)
        drawn = self._conditions(request, shard.label)
        conditions = None if drawn is None else dict(zip(span, rows_of(drawn, span), strict=True))
        accepted: dict[int, tuple[int, np.ndarray]] = {}  # index → (seed, image [1, ...])
        last: dict[int, tuple[int, np.ndarray]] = {}  # index → its latest draw (what a failed shard writes)
        attempts = dict.fromkeys(span, 0)
        generated = rejected = 0
        for size in draw_rounds(len(span), request.spare_fraction, request.spare_rounds):
            owners, seeds = self._assign_draws(shard, request, [i for i in span if i not in accepted], attempts, size)
            asked = None if conditions is None else [conditions[shard.start if i is None else i] for i in owners]
            images = self._generate_and_check(shard.label, seeds, asked, request)
            for owner, seed, (image, ok) in zip(owners, seeds, images, strict=True):
                if owner is None or owner in accepted:  # an idle draw, or a spare its sample no longer needs
                    continue
                generated += 1
                last[owner] = (seed, image)
                if ok:
                    accepted[owner] = (seed, image)
                else:
                    rejected += 1
        samples = self._write_samples(shard, request, root, {**last, **accepted}, conditions)
        missing = len(span) - len(accepted)
        if missing or _too_many_rejections(generated, rejected, request):
            finding = (
                f"{rejected} of {generated} draws of label {shard.label!r} rejected in shard {shard.name}, "
                f"{missing} sample(s) without an accepted draw (limit {request.max_rejection_rate:.0%})"
            )
            result = ShardResult(shard.name, [], generated, rejected, size=len(span), finding=finding)
        else:
            result = ShardResult(shard.name, samples, generated, rejected, size=len(span))
        write_json(root / SHARDS_DIR / f"{shard.name}.json", asdict(result))  # written last: the shard is done
        return result

    def _assign_draws(
        self, shard: Shard, request: CohortRequest, pending: list[int], attempts: dict[int, int], size: int
    ) -> tuple[list[int | None], list[int]]:
        """One round's ``size`` draws, dealt in turn to the samples still pending; with none pending, idle draws
        (generated and filtered like the others, then dropped) keep the round's work the same."""
        owners: list[int | None] = [pending[j % len(pending)] for j in range(size)] if pending else [None] * size
        seeds = []
        for j, owner in enumerate(owners):
            if owner is None:
                seeds.append(sample_seed(self.seed_key, request.seed, shard.label, shard.start, -1 - j))
            else:
                seeds.append(sample_seed(self.seed_key, request.seed, shard.label, owner, attempts[owner]))
                attempts[owner] += 1
        return owners, seeds

    def _generate_and_check(
        self, label: str, seeds: list[int], conditions: list[dict] | None, request: CohortRequest
    ) -> list[tuple[np.ndarray, bool]]:
        """Every draw, generated in one batch and checked by the filter: ``(image [1, ...], accepted)``."""
        options = self.model.sampling_options(steps=request.steps or None, guidance=request.guidance)
        out = self.model.generate(labels=[label] * len(seeds), seed=0, seeds=seeds, conditions=conditions, **options)
        images = out.images.numpy()
        return [(image, decision.accepted) for image, decision in zip(images, self.filter.check(images), strict=True)]

    def _write_samples(
        self,
        shard: Shard,
        request: CohortRequest,
        root: Path,
        decided: dict[int, tuple[int, np.ndarray]],
        conditions: dict[int, dict] | None,
    ) -> list[dict]:
        """Write the shard's samples in index order, once all of them are decided; returns their manifest rows
        (nothing about the filter's decisions beyond "accepted")."""
        rows = []
        for i in sorted(decided):
            seed, image = decided[i]
            covariates = {} if conditions is None else conditions[i]
            files = write_sample(
                root,
                image,
                shard.label,
                i,
                request.formats,
                self.card.voxel_spacing_mm,
                covariates,
                request.released_at,
            )
            rows.append({**files, "label": shard.label, "index": i, "seed": int(seed), "model_id": self.model_id})
            rows[-1].update(covariates)
        if "npz" in request.formats:
            order = sorted(decided)
            np.savez(
                root / SHARDS_DIR / f"{shard.name}.npz",
                images=np.stack([decided[i][1] for i in order]),
                labels=np.array([shard.label] * len(order)),
                seeds=np.array([decided[i][0] for i in order]),
            )
        return rows


def _too_many_rejections(generated: int, rejected: int, request: CohortRequest) -> bool:
    """Above the limit once at least 20 samples were tried (fewer say too little)."""
    return generated >= 20 and rejected / generated > request.max_rejection_rate


Runner = Callable[[list[Shard], CohortRequest, Path], Iterable[ShardResult]]


def local_runner(model_dir: Path, workers: int, device: str) -> Runner:
    """Run shards in this process (workers = 1) or a pool of processes, one model per process."""

    def run(shards: list[Shard], request: CohortRequest, root: Path) -> Iterable[ShardResult]:
        if workers <= 1 or len(shards) <= 1:
            worker = CohortWorker(model_dir, device, request.allow_not_private)
            for shard in shards:
                yield worker.run_shard(shard, request, root)
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_process_worker, initargs=(str(model_dir), device, request)
        ) as pool:
            futures = [pool.submit(_run_in_process, shard, request, str(root)) for shard in shards]
            for future in as_completed(futures):
                yield future.result()

    return run


_PROCESS_WORKER: CohortWorker | None = None


def _init_process_worker(model_dir: str, device: str, request: CohortRequest) -> None:
    import torch

    global _PROCESS_WORKER
    torch.set_num_threads(1)
    _PROCESS_WORKER = CohortWorker(model_dir, device, request.allow_not_private)


def _run_in_process(shard: Shard, request: CohortRequest, root: str) -> ShardResult:
    assert _PROCESS_WORKER is not None
    return _PROCESS_WORKER.run_shard(shard, request, Path(root))


def build_cohort(
    model_dir: str | Path,
    request: CohortRequest,
    out_dir: str | Path,
    *,
    runner: Runner | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: Callable[[CohortProgress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict:
    """Generate → filter → write a complete dataset at ``out_dir``; returns the manifest.

    Raises:
        Conflict: ``out_dir`` exists, or a partial export with a different request exists (without resume).
        MemorizationSuspected: in some shard a sample found no accepted draw, or the share of rejected draws
            exceeded ``request.max_rejection_rate`` (raised once every shard has run).
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    # 1. check inputs (loading the worker checks model, filter and privacy flags); open the partial directory
    worker = CohortWorker(model_dir, device, request.allow_not_private)
    validate_request(worker.model, request)
    check_destination(out, resume)
    tmp = partial_dir(out)
    request = _open_partial(tmp, request, worker.model_id, resume)

    # 2. shards: skip the finished ones (a shard's record is written last)
    shards = plan_shards(request.counts, request.shard_size)
    results = _finished_shards(tmp, shards)
    state = CohortProgress(total=sum(request.counts.values()))
    for result in results.values():
        _tally(state, result)
    if progress:
        progress(state)

    # 3. generate → filter → write, shard by shard (a runner's workers load their own model copies)
    _clear_temporaries(tmp)
    todo = [s for s in shards if s.name not in results]
    results_iter = _run_with_worker(worker, todo, request, tmp) if runner is None else runner(todo, request, tmp)
    for result in results_iter:
        results[result.shard] = result
        _tally(state, result)
        if progress:
            progress(state)
        if cancelled and cancelled():
            raise Conflict("the export was cancelled; rerun with --resume to continue")

    # 4. a finding fails the export only now, after every shard ran (its timing does not say where it was); nothing
    #    of it is kept, not even on the operator's disk (a resume would only find it again)
    findings = [results[s.name].finding for s in shards if results[s.name].finding]
    if findings:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MemorizationSuspected(MEMORIZATION_MESSAGE, detail="; ".join(findings))

    # 5. documents (released counts only: how many were rejected stays here), then one time stamp and the rename
    samples = [row for shard in shards for row in results[shard.name].samples]
    counts = {"samples": len(samples), "per_label": {label: n for label, n in request.counts.items()}}
    if "npz" in request.formats:
        _merge_npz(tmp, shards)
    manifest = write_documents(
        tmp,
        samples=samples,
        card=worker.card,
        calibration=worker.calibration,
        counts=counts,
        request=request.as_dict(),
        model_id=worker.model_id,
    )
    shutil.rmtree(tmp / SHARDS_DIR)
    (tmp / REQUEST_FILE).unlink()
    publish_directory(tmp, out, mtime=release_time(request).timestamp())
    return manifest


def release_time(request: CohortRequest) -> datetime:
    """The one time every file of the request's dataset carries (UTC)."""
    assert request.released_at is not None, "build_cohort fixes the release time before any shard runs"
    return datetime.fromisoformat(request.released_at)


def _open_partial(tmp: Path, request: CohortRequest, model_id: str, resume: bool) -> CohortRequest:
    """Create or reopen the partial export at ``tmp`` for ``request``; returns the request with its release time
    fixed (a resumed export keeps the time it started with, so every file carries one time)."""
    identity = {"request": {**request.as_dict(), "released_at": None}, "model_id": model_id}
    released_at = request.released_at or datetime.now(UTC).isoformat(timespec="seconds")
    if tmp.exists():  # resuming (check_destination refused it otherwise)
        previous = json.loads((tmp / REQUEST_FILE).read_text()) if (tmp / REQUEST_FILE).is_file() else {}
        if {k: previous.get(k) for k in identity} != identity:
            raise Conflict(
                "the unfinished export was started with a different request or model; delete it to start over"
            )
        released_at = previous.get("released_at") or released_at
    (tmp / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(tmp / REQUEST_FILE, {**identity, "released_at": released_at})
    return replace(request, released_at=released_at)


def _finished_shards(tmp: Path, shards: list[Shard]) -> dict[str, ShardResult]:
    results = {}
    for shard in shards:
        record = tmp / SHARDS_DIR / f"{shard.name}.json"
        if record.is_file():
            results[shard.name] = ShardResult(**json.loads(record.read_text()))
    return results


def _run_with_worker(
    worker: CohortWorker, shards: list[Shard], request: CohortRequest, root: Path
) -> Iterable[ShardResult]:
    for shard in shards:
        yield worker.run_shard(shard, request, root)


def _clear_temporaries(root: Path) -> None:
    """Remove temp files a killed process left behind (finished files are complete: they were renamed)."""
    for path in root.rglob(".*.tmp*"):
        path.unlink(missing_ok=True)


def _tally(state: CohortProgress, result: ShardResult) -> None:
    state.done += result.size
    state.generated += result.generated
    state.rejected += result.rejected
    state.accepted += len(result.samples)
    label = result.shard.rsplit("-", 1)[0]
    entry = state.per_label.setdefault(label, {"generated": 0, "rejected": 0, "accepted": 0})
    entry["generated"] += result.generated
    entry["rejected"] += result.rejected
    entry["accepted"] += len(result.samples)


def _merge_npz(root: Path, shards: list[Shard]) -> None:
    parts = [np.load(root / SHARDS_DIR / f"{s.name}.npz") for s in shards]
    np.savez(
        root / "cohort.npz",
        images=np.concatenate([p["images"] for p in parts]),
        labels=np.concatenate([p["labels"] for p in parts]),
        seeds=np.concatenate([p["seeds"] for p in parts]),
    )
