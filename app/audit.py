"""The privacy and utility audit of a model bundle: one function that measures, one report directory.

``run_audit(store, model_dir, out, AuditSettings(n=500))`` generates a cohort with the release pipeline
(:func:`app.pipeline.build_cohort`, filter on) and an unfiltered batch from the same seeds, then measures

- utility: a small CNN trained on synthetic / tested on the real holdout (TSTR) against one trained on the
  real training split (TRTR), accuracy and AUC;
- fidelity and diversity: Fréchet distances (TRTR classifier features; filter embedding) of synthetic vs
  holdout next to train vs holdout, within-set MS-SSIM, per-label intensity histograms;
- privacy: DCR share, the filter's catch rate on unfiltered samples, a loss-based and a distance-based
  membership-inference attack per patient, and the ceiling the model's (ε, δ) puts on any attack.

The report reads private data and is an internal artifact: it is written 0700 with a PRIVATE marker and is
never served. Training images appear in it only with ``include_neighbours``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from app.audit_schema import (
    AuditReport,
    CohortMeasured,
    Fidelity,
    ModelMeasured,
    Privacy,
    StoreMeasured,
    Utility,
)
from app.pipeline import CohortRequest, MemorizationSuspected, build_cohort, load_seed_key, sample_seed
from generators.atomic import publish_directory
from generators.base import Generator, resolve_device
from generators.card import ModelCard
from generators.demographics import AGE_MAX, SEXES
from generators.errors import Conflict, InvalidInput
from generators.layout import BundleLayout
from generators.registry import load_generator
from privacy_filters import MemorizationFilter, fidelity
from privacy_filters import audit_classifier as clf
from privacy_filters import membership_inference as mia
from privacy_filters.canaries import DOCUMENTED, KINDS_3D, NOT_COVERED, STRENGTH_GRID
from privacy_filters.embeddings import embed, make_embedding
from privacy_filters.memorization import rejection_curves
from train.accounting import epsilon_of
from train.preprocess import resize_split
from train.store import CohortStore

FEATURE_EMBEDDING = "aligned-pyramid"  # the fixed 256-d feature space of Fréchet distances, DCR and the MC attack
STAGES = 12  # progress callbacks per run (load, cohort, unfiltered, matched cohort, classifiers, fidelity, covariates,
# dcr, canaries, 2 attacks, report)
MAX_PER_LABEL = 20_000
PRIVACY_CURVE_DELTAS = tuple(np.geomspace(1e-12, 0.5, 25).tolist())  # δ grid for the tightest TPR bound
INTERNAL_NOTICE = (
    "INTERNAL AUDIT REPORT: computed from the private training cohort. Share with the privacy office only; "
    "never serve it or attach it to a released dataset."
)


@dataclass(frozen=True)
class AuditSettings:
    """What the audit measures and with how much effort (defaults: ≤ 10 min on 2 CPU cores, demo cohort)."""

    n: int = 500  # synthetic samples of EVERY label
    matched_tstr: bool = True  # TSTR also trains on as many synthetic items as TRTR has real ones (the fair protocol)
    seed: int = 0
    include_neighbours: bool = False
    classifier_steps: int = 600
    classifier_seeds: int = 3
    mia_timesteps: tuple[int, ...] = (25, 100, 250, 500)
    mc_quantile: float = 0.01
    ms_ssim_pairs: int = 500
    canary_sources: int = 100  # training slices copied per transform and strength for the filter's curves
    sampler_steps: int | None = None  # solver steps of every sample (default: the card's, what a release uses)
    device: str = "auto"


@dataclass
class RealData:
    """Train and holdout slices at the model's size, with label ids in the model's numbering."""

    train: np.ndarray
    train_labels: np.ndarray
    train_patients: np.ndarray
    holdout: np.ndarray
    holdout_labels: np.ndarray
    holdout_patients: np.ndarray
    train_ages: np.ndarray  # years, -1 unknown
    train_sexes: np.ndarray  # F, M or U
    holdout_ages: np.ndarray
    holdout_sexes: np.ndarray


@dataclass
class Synthetic:
    """Generated images ``[N, 1, H, W]`` and their label ids."""

    images: np.ndarray
    labels: np.ndarray
    extra: dict = field(default_factory=dict)


def run_audit(
    store_path: str | Path,
    model_dir: str | Path,
    out: str | Path,
    settings: AuditSettings = AuditSettings(),
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Measure everything, write ``out/report.json``, ``out/report.html`` and ``out/figures/``; return the report.

    Raises:
        Conflict: ``out`` exists (without ``force``).
        InvalidInput: the store is not the model's training store, or the settings are out of range.
    """
    from app.audit_report import write_report  # matplotlib is imported only when a report is written

    model_dir, out = Path(model_dir), Path(out)
    step = progress or (lambda _: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    # 1. inputs
    _validate(settings)
    if out.exists() and not force:
        raise Conflict(f"{out} already exists; choose a new report directory or pass --force")
    step("loading the model, its filter and the cohort store")
    device = resolve_device(settings.device)
    model = load_generator(model_dir, device=str(device))
    card = model.card
    store = CohortStore.open(store_path)
    if card.store_id != store.store_id:
        raise InvalidInput(
            "this store is not the one the model was trained on (store ids differ); audit with the training store"
        )
    filt = MemorizationFilter.load(BundleLayout(model_dir).filter_dir, device=device)
    real = load_real(store, model)
    label_names = list(model.label_ids)
    lap("load")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(work, 0o700)
        # 2. the released cohort (filter on) and an unfiltered batch from the same first-attempt seeds
        step(f"generating {settings.n} samples per label through the release pipeline (filter on)")
        cohort, finding = _filtered_cohort(model_dir, label_names, settings, work, str(device))
        lap("cohort_pipeline")
        step("generating the same first-attempt seeds with the filter off")
        raw = _unfiltered_batch(model, load_seed_key(model_dir), label_names, settings)
        raw_scores = filt.distances(raw.images) / filt.threshold
        if cohort is None:  # the pipeline refused to release anything: audit the closest stand-in
            cohort = _stand_in(raw, raw_scores, len(label_names), finding)
        lap("unfiltered_batch")

        # 3. utility: TSTR on a synthetic training set as large as the real one (same label shares), and on the n per
        #    label of the cohort above for comparison; the classifier's budget is the same for every set
        matched = None
        if settings.matched_tstr:
            step("generating a synthetic training set as large as the real one (release pipeline, filter on)")
            matched = _matched_cohort(model_dir, label_names, real, settings, work, str(device))
            lap("matched_cohort")
        step("training TRTR / TSTR classifiers")
        utility, trtr_model = utility_section(real, cohort, len(label_names), settings, device, matched=matched)
        lap("classifiers")

        # 4. fidelity and diversity
        step("fidelity: Fréchet distances, MS-SSIM, intensity histograms")
        embedding = make_embedding(FEATURE_EMBEDDING, model.image_shape[-1], model.spatial_dims)  # fixed across runs
        fid = fidelity_section(real, cohort, label_names, trtr_model, embedding, settings)
        lap("fidelity")

        step("covariates: how well the requested age and sex are honoured")
        covariates = _covariate_fidelity(model_dir, card, label_names, real, settings, work, device)
        lap("covariates")

        # 5. privacy
        step("privacy: distances to closest records")
        dcr = _dcr(real, cohort, raw, filt, embedding, settings)
        lap("dcr")
        step("privacy: near-copies the filter catches, by transform and strength")
        canaries = _canaries(real, filt, settings)
        lap("canaries")
        step("privacy: loss-based membership inference (per patient)")
        loss_attack = _loss_attack(model, real, settings)
        lap("mia_loss")
        step("privacy: Monte-Carlo distance attack on generated samples (per patient)")
        mc_attack = _monte_carlo_attack(real, cohort, raw, embedding, settings)
        lap("mia_monte_carlo")
        bound = _dp_bound(card)
        lap("dp_bound")

        report = AuditReport(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            notice=INTERNAL_NOTICE,
            settings={**asdict(settings), "device": str(device)},
            model=_model_summary(model_dir, card),
            store=_store_summary(store, real),
            cohort=CohortMeasured(
                per_label=settings.n,
                accepted=len(cohort.images),
                **cohort.extra,
                reproduce=f"synthcohort export MODEL_DIR --n {settings.n} --seed {settings.seed}"
                + (" --allow-not-private" if not card.dp else ""),
            ),
            utility=Utility.model_validate(utility),
            fidelity=Fidelity.model_validate(fid),
            covariates=covariates,
            privacy=Privacy.model_validate(
                {
                    "filter": {
                        "quantile": filt.quantile,
                        "holdout_acceptance_rate": filt.record.get("holdout_acceptance_rate"),
                        "catch_rate_unfiltered": float(np.mean(raw_scores < 1.0)),
                        "catch_rate_by_label": {
                            name: float(np.mean(raw_scores[raw.labels == model.label_ids[name]] < 1.0))
                            for name in label_names
                        },
                        "meaning": "share of unfiltered samples the memorization filter rejects; by construction "
                        "about the quantile for samples as far from training as unseen patients are",
                        "canaries": canaries,
                    },
                    "dcr": dcr,
                    "membership_inference": {"loss": loss_attack, "monte_carlo": mc_attack},
                    "dp_bound": bound,
                }
            ),
            timings_s=timings,
        )
        neighbours = _neighbours(real, raw, raw_scores, filt) if settings.include_neighbours else None
        step("writing report.json, figures and report.html")
        write_report(work, report, cohort=cohort, label_names=label_names, neighbours=neighbours)
        report.timings_s["report"] = round(time.perf_counter() - clock, 2)
        report.timings_s["total"] = round(sum(v for k, v in report.timings_s.items() if k != "total"), 2)
        (work / "report.json").write_text(report.to_json())
        shutil.rmtree(work / "cohort", ignore_errors=True)
        shutil.rmtree(work / "covariates", ignore_errors=True)
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


# ------------------------------------------------------------------------------------------- inputs
def _validate(s: AuditSettings) -> None:
    if not 2 <= s.n <= MAX_PER_LABEL:
        raise InvalidInput(f"--n must be between 2 and {MAX_PER_LABEL} samples per label, got {s.n}")
    if not 1 <= s.classifier_steps <= 100_000 or not 1 <= s.classifier_seeds <= 20:
        raise InvalidInput("classifier steps must be in 1..100000 and classifier seeds in 1..20")
    if not s.mia_timesteps or any(not 0 <= t < 1000 for t in s.mia_timesteps):
        raise InvalidInput("membership-inference timesteps must be in 0..999")
    if not 0.0 < s.mc_quantile < 1.0 or s.ms_ssim_pairs < 1 or s.canary_sources < 1:
        raise InvalidInput("the Monte-Carlo quantile must be in (0, 1); MS-SSIM pairs and canary sources ≥ 1")


def load_real(store: CohortStore, model: Generator) -> RealData:
    """The store's real training and held-out images at the model's size, with labels (audit and benchmarks)."""
    names = store.label_names
    unknown = sorted(set(names) - set(model.label_ids))
    if unknown:
        raise InvalidInput(f"the store has labels the model does not know: {unknown}")
    to_model = np.array([model.label_ids[n] for n in names], dtype=np.int64)
    train, holdout = store.read("train"), store.read("holdout")
    if len(holdout.images) == 0:
        raise InvalidInput("the store has no held-out patients; the audit needs them as non-members")
    size = model.image_shape[-1]
    return RealData(
        train=np.ascontiguousarray(resize_split(train.images, size), dtype=np.float32),
        train_labels=to_model[train.labels],
        train_patients=np.asarray(train.patients),
        holdout=np.ascontiguousarray(resize_split(holdout.images, size), dtype=np.float32),
        holdout_labels=to_model[holdout.labels],
        holdout_patients=np.asarray(holdout.patients),
        train_ages=np.asarray(train.ages),
        train_sexes=np.asarray(train.sexes),
        holdout_ages=np.asarray(holdout.ages),
        holdout_sexes=np.asarray(holdout.sexes),
    )


# ---------------------------------------------------------------------------------------- samples
def _filtered_cohort(
    model_dir: Path, label_names: list[str], s: AuditSettings, work: Path, device: str
) -> tuple[Synthetic | None, str | None]:
    """The cohort :func:`build_cohort` releases, or ``(None, finding)`` when it stops on memorization."""
    request = CohortRequest(
        counts={name: s.n for name in label_names},
        seed=s.seed,
        formats=("nifti", "npz"),
        steps=s.sampler_steps,
        allow_not_private=True,
    )
    totals: dict[str, int] = {}
    try:  # the filter's totals come through the progress callback: the released dataset does not carry them
        build_cohort(
            model_dir,
            request,
            work / "cohort",
            device=device,
            progress=lambda state: totals.update(generated=state.generated, rejected=state.rejected),
        )
    except MemorizationSuspected as finding:
        return None, f"{finding} ({finding.detail})"
    with np.load(work / "cohort" / "cohort.npz") as data:
        images, names = data["images"].astype(np.float32), data["labels"]
    ids = {name: i for i, name in enumerate(label_names)}
    labels = np.array([ids[str(n)] for n in names], dtype=np.int64)
    extra = {
        "pipeline_stopped": False,
        **totals,
        "source": "the cohort the release pipeline (build_cohort) produced",
    }
    return Synthetic(images, labels, extra), None


def _matched_cohort(
    model_dir: Path, label_names: list[str], real: RealData, s: AuditSettings, work: Path, device: str
) -> Synthetic | None:
    """As many released samples per label as the real training set has items of that label (a seed of its own, so
    none repeats the cohort's), or ``None`` when the pipeline refuses the model (then TSTR has the small set only)."""
    counts = {name: int((real.train_labels == i).sum()) for i, name in enumerate(label_names)}
    request = CohortRequest(
        counts={name: max(n, 2) for name, n in counts.items()},
        seed=s.seed + 1,
        formats=("nifti", "npz"),
        steps=s.sampler_steps,
        allow_not_private=True,
    )
    try:
        build_cohort(model_dir, request, work / "matched", device=device)
    except MemorizationSuspected:
        return None
    with np.load(work / "matched" / "cohort.npz") as data:
        images, names = data["images"].astype(np.float32), data["labels"]
    shutil.rmtree(work / "matched", ignore_errors=True)
    ids = {name: i for i, name in enumerate(label_names)}
    return Synthetic(images, np.array([ids[str(n)] for n in names], dtype=np.int64))


def _stand_in(raw: Synthetic, scores: np.ndarray, n_labels: int, finding: str | None) -> Synthetic:
    """What to measure when the pipeline stopped: the samples the filter accepts, or all samples if too few."""
    keep = scores >= 1.0
    if all((raw.labels[keep] == i).sum() >= 2 for i in range(n_labels)):
        images, labels = raw.images[keep], raw.labels[keep]
        source = "the unfiltered samples the filter accepts (the pipeline itself released nothing)"
    else:
        images, labels = raw.images, raw.labels
        source = "the whole unfiltered batch: the filter accepts too few samples (the pipeline released nothing)"
    return Synthetic(images, labels, {"pipeline_stopped": True, "finding": finding, "source": source})


def _unfiltered_batch(model: Generator, key: bytes, label_names: list[str], s: AuditSettings) -> Synthetic:
    names = [name for name in label_names for _ in range(s.n)]
    seeds = [sample_seed(key, s.seed, name, i, 0) for name in label_names for i in range(s.n)]
    generated = model.generate(labels=names, seed=0, seeds=seeds, **model.sampling_options(steps=s.sampler_steps))
    labels = np.array([model.label_ids[n] for n in names], dtype=np.int64)
    return Synthetic(generated.images.numpy(), labels)


# --------------------------------------------------------------------------------------- covariates
def _covariate_fidelity(
    model_dir: Path, card: ModelCard, label_names: list[str], real: RealData, s: AuditSettings, work: Path, device
) -> dict | None:
    """For a model trained on covariates: a cohort through the release pipeline with ages drawn uniformly over
    the declared range and sexes half and half; an age regressor and a sex classifier trained on the real
    training images, scored on held-out real images (their true values) and on the synthetic ones (the
    requested values), next to a constant guess (the training mean age; chance for sex)."""
    declared = card.covariates
    if not declared:
        return None
    targets: dict = {}
    if "age" in declared:
        targets["age"] = {"min": declared["age"]["min"], "max": declared["age"]["max"]}
    if "sex" in declared:
        targets["sex"] = {"F": 0.5, "M": 0.5}
    request = CohortRequest(
        counts={name: s.n for name in label_names},
        seed=s.seed + 1,
        formats=("nifti", "npz"),
        covariates={name: targets for name in label_names},
        steps=s.sampler_steps,
        allow_not_private=True,
    )
    try:
        manifest = build_cohort(model_dir, request, work / "covariates", device=str(device))
    except MemorizationSuspected as finding:
        return {"declared": declared, "finding": str(finding)}
    with np.load(work / "covariates" / "cohort.npz") as data:
        images = data["images"].astype(np.float32)
    samples = manifest["samples"]
    result: dict = {"declared": declared, "requested": targets, "synthetic_samples": len(samples)}
    batch = 32 if real.train.ndim == 5 else 128
    fit = {"steps": s.classifier_steps, "batch_size": batch, "seed": s.seed * 1000, "device": device}
    if "age" in declared:
        result["age"] = _age_fidelity(real, images, np.array([row["age"] for row in samples]), fit)
    if "sex" in declared:
        result["sex"] = _sex_fidelity(real, images, np.array([row["sex"] for row in samples]), fit)
    result["method"] = (
        f"SmallCNN ({_classifier_design(real.train.ndim - 2)}) trained on the real training {_items(real)} "
        f"({s.classifier_steps} steps): a regressor of age / {AGE_MAX} (mean squared error) and a sex classifier; "
        "scored on held-out real images against their true values and on synthetic images against the values "
        "they were generated for"
    )
    return result


def _age_fidelity(real: RealData, images: np.ndarray, requested: np.ndarray, fit: dict) -> dict:
    known, hold = real.train_ages >= 0, real.holdout_ages >= 0
    if known.sum() < 2 or hold.sum() < 2:
        return {"note": "too few real images with a known age"}
    model = clf.train_regressor(real.train[known], real.train_ages[known] / AGE_MAX, **fit)
    on_real = clf.predict_values(model, real.holdout[hold]) * AGE_MAX
    on_synthetic = clf.predict_values(model, images) * AGE_MAX
    truth, guess = real.holdout_ages[hold], float(real.train_ages[known].mean())
    return {
        "mae_real_holdout": float(np.abs(on_real - truth).mean()),
        "mae_synthetic": float(np.abs(on_synthetic - requested).mean()),
        "mae_constant_real_holdout": float(np.abs(guess - truth).mean()),
        "mae_constant_synthetic": float(np.abs(guess - requested).mean()),
        "correlation_real_holdout": float(np.corrcoef(on_real, truth)[0, 1]),
        "correlation_synthetic": float(np.corrcoef(on_synthetic, requested)[0, 1]),
    }


def _sex_fidelity(real: RealData, images: np.ndarray, requested: np.ndarray, fit: dict) -> dict:
    known, hold = np.isin(real.train_sexes, SEXES), np.isin(real.holdout_sexes, SEXES)
    if len(set(real.train_sexes[known])) < 2 or hold.sum() < 2:
        return {"note": "too few real images of each sex"}
    male = {sex: int(sex == "M") for sex in SEXES}
    model = clf.train_classifier(real.train[known], np.array([male[x] for x in real.train_sexes[known]]), 2, **fit)
    on_real, _ = clf.predict(model, real.holdout[hold])
    on_synthetic, _ = clf.predict(model, images)
    return {
        "accuracy_real_holdout": clf.score(on_real, np.array([male[x] for x in real.holdout_sexes[hold]])).accuracy,
        "accuracy_synthetic": clf.score(on_synthetic, np.array([male[x] for x in requested])).accuracy,
        "chance": 0.5,
    }


# ------------------------------------------------------------------------------------------ utility
def _classifier_design(spatial_dims: int) -> str:
    layers = "3 conv blocks 16-32-64, GroupNorm, SiLU, global max pool, 64-d features"
    return f"3-D, voxels standardised by its own training set, {layers}" if spatial_dims == 3 else f"2-D, {layers}"


def utility_section(
    real: RealData,
    synthetic: Synthetic,
    n_classes: int,
    s: AuditSettings,
    device: torch.device,
    *,
    matched: Synthetic | None = None,
) -> tuple[dict, clf.SmallCNN]:
    """TRTR and TSTR on real held-out patients, with one fixed classifier budget (steps, batch, seeds) for all.

    With ``matched`` (as many synthetic items as real training ones), ``tstr`` is that fair protocol and
    ``tstr_small_n`` the cohort's n per label; without it, ``tstr`` is the n per label.
    """
    sets = {"trtr": (real.train, real.train_labels)}
    if matched is not None:
        sets |= {"tstr": (matched.images, matched.labels), "tstr_small_n": (synthetic.images, synthetic.labels)}
    else:
        sets["tstr"] = (synthetic.images, synthetic.labels)
    runs: dict[str, list[clf.ClassifierScores]] = {name: [] for name in sets}
    first_trtr = None
    batch = 32 if real.train.ndim == 5 else 128  # volumes: a quarter of the batch, about the same compute
    for k in range(s.classifier_seeds):
        seed = s.seed * 1000 + k
        for name, (x, y) in sets.items():
            model = clf.train_classifier(
                x, y, n_classes, steps=s.classifier_steps, batch_size=batch, seed=seed, device=device
            )
            probs, _ = clf.predict(model, real.holdout)
            runs[name].append(clf.score(probs, real.holdout_labels))
            if name == "trtr" and first_trtr is None:
                first_trtr = model

    def summary(scores: list[clf.ClassifierScores]) -> dict:
        acc = np.array([r.accuracy for r in scores])
        auc = np.array([r.auc for r in scores])
        return {
            "accuracy": float(acc.mean()),
            "accuracy_sd": float(acc.std()),
            "auc": float(auc.mean()),
            "auc_sd": float(auc.std()),
            "per_seed": [asdict(r) for r in scores],
        }

    trtr, tstr = summary(runs["trtr"]), summary(runs["tstr"])
    protocol = (
        f"TSTR trains on {len(sets['tstr'][0])} synthetic {_items(real)}, as many as TRTR's real ones with the same "
        f"label shares (tstr); tstr_small_n on the released cohort's {len(synthetic.images)}, for comparison"
        if matched is not None
        else f"TSTR trains on the released cohort's {len(synthetic.images)} synthetic {_items(real)}"
    )
    result = {
        "protocol": protocol,
        "classifier": f"SmallCNN ({_classifier_design(real.train.ndim - 2)}), "
        f"AdamW one-cycle, {s.classifier_steps} steps of {batch} with flips and ±2 px shifts; mean over "
        f"{s.classifier_seeds} seeds",
        "test_set": f"real held-out patients ({len(real.holdout)} {_items(real)}), {_items(real)[:-1]} level",
        "trtr": trtr,
        "tstr": tstr,
        "ratio": _ratio(tstr, trtr),
    }
    if matched is not None:
        small = summary(runs["tstr_small_n"])
        result |= {"tstr_small_n": small, "ratio_small_n": _ratio(small, trtr)}
    assert first_trtr is not None
    return result, first_trtr


def _ratio(tstr: dict, trtr: dict) -> dict:
    return {key: tstr[key] / trtr[key] if trtr[key] else float("nan") for key in ("accuracy", "auc")}


# ----------------------------------------------------------------------------------------- fidelity
def fidelity_section(
    real: RealData,
    synthetic: Synthetic,
    label_names: list[str],
    trtr_model: clf.SmallCNN,
    embedding,
    s: AuditSettings,
) -> dict:
    """Fidelity of the synthetic set against an equal-sized subset of the real training set: Fréchet distances in
    two feature spaces (as ratios to train-vs-held-out), same-label MS-SSIM and per-label intensity histograms."""
    rng = np.random.default_rng(s.seed)
    n = min(len(synthetic.images), len(real.train))
    train_sub = real.train[np.sort(rng.choice(len(real.train), size=n, replace=False))]

    def frechet(features: Callable[[np.ndarray], np.ndarray]) -> dict:
        hold, syn, trn = features(real.holdout), features(synthetic.images), features(train_sub)
        synthetic_vs_holdout = fidelity.frechet_distance(syn, hold)
        train_vs_holdout = fidelity.frechet_distance(trn, hold)
        return {
            "synthetic_vs_holdout": synthetic_vs_holdout,
            "train_vs_holdout": train_vs_holdout,
            "ratio": synthetic_vs_holdout / train_vs_holdout if train_vs_holdout > 0 else float("inf"),
        }

    ms_ssim: dict[str, dict[str, float]] = {"synthetic": {}, "real": {}}
    intensity: dict[str, dict] = {}
    for i, name in enumerate(label_names):
        syn, trn = synthetic.images[synthetic.labels == i], real.train[real.train_labels == i]
        if len(syn) >= 2 and len(trn) >= 2:
            ms_ssim["synthetic"][name] = fidelity.mean_pairwise_ms_ssim(_axial(syn), pairs=s.ms_ssim_pairs, seed=s.seed)
            ms_ssim["real"][name] = fidelity.mean_pairwise_ms_ssim(_axial(trn), pairs=s.ms_ssim_pairs, seed=s.seed)
        if len(syn) and len(trn):
            syn_hist, edges = fidelity.intensity_histogram(syn)
            real_hist, _ = fidelity.intensity_histogram(trn)
            intensity[name] = {
                "wasserstein": fidelity.intensity_distance(syn, trn, seed=s.seed),
                "edges": edges.tolist(),
                "synthetic_density": syn_hist.tolist(),
                "real_density": real_hist.tolist(),
            }
    return {
        "frechet": {
            "classifier_features": frechet(lambda x: clf.predict(trtr_model, x)[1]),
            "filter_embedding": frechet(lambda x: embed(embedding, x)),
            "feature_spaces": "classifier_features = 64-d penultimate layer of the first TRTR classifier (trained on "
            f"the real training split); filter_embedding = the fixed {embedding.name} embedding (the filter's "
            "former default, kept so numbers stay comparable across filter versions). "
            f"Equal sizes: {n} synthetic and {n} training slices against all held-out slices.",
        },
        "ms_ssim": {
            **ms_ssim,
            "meaning": f"mean MS-SSIM of {s.ms_ssim_pairs} random same-label pairs within a set "
            f"({fidelity.ms_ssim_levels(real.train.shape[-1])} scales; volumes: their axial mid-slices); lower = more "
            "diverse; real = training split",
        },
        "intensity": intensity,
    }


def _items(real: RealData) -> str:
    return "volumes" if real.train.ndim == 5 else "slices"


def _axial(images: np.ndarray) -> np.ndarray:
    """Slices as they are; volumes ``[N, 1, D, H, W]`` as their axial mid-slices (2-D measures)."""
    return images[:, :, images.shape[2] // 2] if images.ndim == 5 else images


# ------------------------------------------------------------------------------------------ privacy
def _dcr(
    real: RealData, cohort: Synthetic, raw: Synthetic, filt: MemorizationFilter, embedding, s: AuditSettings
) -> dict:
    rng = np.random.default_rng(s.seed)
    holdout_ids = np.unique(real.holdout_patients)
    train_ids = np.unique(real.train_patients)
    chosen = rng.choice(train_ids, size=min(len(holdout_ids), len(train_ids)), replace=False)
    train_sub = real.train[np.isin(real.train_patients, chosen)]

    def share(images: np.ndarray) -> float:
        return fidelity.dcr_share(
            fidelity.nearest_distances(embedding, train_sub, images),
            fidelity.nearest_distances(embedding, real.holdout, images),
        )

    return {
        "share_filtered": share(cohort.images),
        "share_unfiltered": share(raw.images),
        "reference": f"{len(chosen)} training patients ({len(train_sub)} slices) vs all {len(holdout_ids)} held-out "
        f"patients ({len(real.holdout)} slices); distances in the fixed {embedding.name} embedding, "
        "mirror-invariant",
        "target": "≈ 0.5: synthetic samples are no closer to training patients than to unseen ones",
        "distances_to_train": {
            "synthetic_filtered": filt.distances(cohort.images).tolist(),
            "synthetic_unfiltered": filt.distances(raw.images).tolist(),
            "holdout": filt.distances(real.holdout).tolist(),
            "filter_threshold": filt.threshold,
        },
    }


def _canaries(real: RealData, filt: MemorizationFilter, s: AuditSettings) -> dict:
    rng = np.random.default_rng(s.seed)
    sources = real.train[
        np.sort(rng.choice(len(real.train), size=min(s.canary_sources, len(real.train)), replace=False))
    ]
    grid = {k: v for k, v in STRENGTH_GRID.items() if k in KINDS_3D} if sources.ndim == 5 else None
    curves = rejection_curves(filt, sources, grid, seed=s.seed)
    at_documented = {
        kind: next(p["rejected"] for p in points if p["strength"] == DOCUMENTED[kind])
        for kind, points in curves.items()
    }
    covered = {k: v for k, v in at_documented.items() if k not in NOT_COVERED}
    kinds = ", ".join(curves)
    return {
        "curves": curves,
        "documented": DOCUMENTED,
        "at_documented": at_documented,
        "covered_rejection": float(np.mean(list(covered.values()))),
        "worst": min(covered, key=covered.get) + f" {min(covered.values()):.0%}",
        "not_covered": list(NOT_COVERED),
        "meaning": f"near-copies of {len(sources)} random training images under each transform in "
        f"privacy_filters.canaries ({kinds}) at growing strength: the share the filter rejects. The filter "
        f"promises ≥ 99 % at the documented strengths for every kind but {', '.join(NOT_COVERED)}.",
    }


def _loss_attack(model: Generator, real: RealData, s: AuditSettings) -> dict:
    images = np.concatenate([real.train, real.holdout])
    labels = np.concatenate([real.train_labels, real.holdout_labels])
    losses = model.membership_losses(images, labels, timesteps=s.mia_timesteps, seed=s.seed)
    scores = mia.loss_scores(losses)
    member, nonmember = _patient_scores(scores, real)
    return {
        **mia.attack_roc(member, nonmember),
        "attack": f"white-box: −(z-scored denoising loss) at timesteps {list(s.mia_timesteps)} with fixed noise, "
        "averaged over each patient's slices; members = training patients, non-members = held-out patients",
    }


def _monte_carlo_attack(real: RealData, cohort: Synthetic, raw: Synthetic, embedding, s: AuditSettings) -> dict:
    candidates = embed(embedding, np.concatenate([real.train, real.holdout]))
    result = {}
    for name, generated in (("filtered", cohort), ("unfiltered", raw)):
        scores, radius = mia.monte_carlo_scores(candidates, embed(embedding, generated.images), quantile=s.mc_quantile)
        member, nonmember = _patient_scores(scores, real)
        result[name] = {**mia.attack_roc(member, nonmember), "radius": radius}
    result["attack"] = (
        f"black-box on generated samples: share of samples within the {s.mc_quantile:.0%} quantile of candidate→sample "
        f"distances ({embedding.name} embedding), averaged over each patient's slices"
    )
    return result


def _patient_scores(scores: np.ndarray, real: RealData) -> tuple[np.ndarray, np.ndarray]:
    n_train = len(real.train)
    _, member = mia.per_patient(scores[:n_train], real.train_patients)
    _, nonmember = mia.per_patient(scores[n_train:], real.holdout_patients)
    return member, nonmember


def _dp_bound(card: ModelCard) -> dict:
    if not card.dp:
        return {"private": False, "statement": "NOT PRIVATE: no differential-privacy bound limits these attacks"}
    curve = [(float(card.epsilon), float(card.delta))]  # type: ignore[arg-type]
    history = [tuple(m) for m in card.privacy_history]
    for delta in PRIVACY_CURVE_DELTAS:
        eps = epsilon_of(history, delta=delta, accountant=card.accountant or "prv")
        if np.isfinite(eps):
            curve.append((eps, delta))
    tpr = mia.dp_tpr_bound(mia.LOW_FPR, curve)
    single = mia.dp_tpr_bound(mia.LOW_FPR, curve[:1])
    return {
        "private": True,
        "epsilon": card.epsilon,
        "delta": card.delta,
        "tpr_at_low_fpr": float(tpr),
        "tpr_at_low_fpr_card_pair_only": float(single),
        "auc": mia.dp_auc_bound(curve),
        "auc_card_pair_only": mia.dp_auc_bound(curve[:1]),
        "low_fpr": mia.LOW_FPR,
        "privacy_curve": [{"epsilon": e, "delta": d} for e, d in curve],
        "meaning": "the largest TPR / AUC ANY membership attack on the model can reach, from the model's privacy "
        "curve (ε(δ) from its accountant over a δ grid; TPR ≤ e^ε·FPR + δ for every pair). Covers the loss attack "
        "and attacks on unfiltered samples; the filter reads training data, so filtered outputs are not strictly "
        "covered by ε.",
    }


def _neighbours(real: RealData, raw: Synthetic, raw_scores: np.ndarray, filt: MemorizationFilter, k: int = 8) -> dict:
    closest = np.argsort(raw_scores)[:k]
    _, ids = filt.nearest_training_indices(raw.images[closest])
    return {"synthetic": raw.images[closest], "training": real.train[ids], "scores": raw_scores[closest]}


# -------------------------------------------------------------------------------------------- output
# The training choices that decide utility, copied from the card so a report says which recipe it measured.
RECIPE_KEYS = (
    "trainable",
    "label_init",
    "slices_per_patient",
    "noise_multiplicity",
    "timestep_sampling",
    "timestep_mean",
    "learning_rate",
    "epochs",
    "batch_size",
    "public_prior",
    "public_pretrain_steps",
    "public_anomaly_rate",
    "prediction",
)


def _model_summary(model_dir: Path, card: ModelCard) -> ModelMeasured:
    keys = ("dp", "epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "sample_rate", "steps")
    return ModelMeasured(
        dir_name=model_dir.name,
        generator=card.generator,
        training_inputs_digest=card.training_inputs_digest,
        preset=card.preset.get("name"),
        recipe={k: card.preset.get(k) for k in RECIPE_KEYS},
        image_size=card.image_size,
        labels=list(card.labels),
        **card.public(keys),
        statement=card.statement,
    )


def _store_summary(store: CohortStore, real: RealData) -> StoreMeasured:
    return StoreMeasured(
        fingerprint=store.fingerprint,
        n_train_patients=len(np.unique(real.train_patients)),
        n_holdout_patients=len(np.unique(real.holdout_patients)),
        n_train_slices=len(real.train),
        n_holdout_slices=len(real.holdout),
    )


def _publish(work: Path, out: Path) -> None:
    """Mark the report private and move it into place (replacing an old report only once complete)."""
    (work / "PRIVATE").write_text(INTERNAL_NOTICE + "\n")
    for path in work.rglob("*"):
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    publish_directory(work, out)
