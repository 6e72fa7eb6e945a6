"""The audit report as typed records: what ``run_audit`` returns, ``report.json`` holds and ``report.html`` shows.

One pydantic model per section (utility, fidelity, privacy with its filter, canaries, distances and attacks,
covariates, the cohort measured); unknown fields are refused, so a renamed measurement fails where it is made, not
in a reader. Curves and per-seed rows stay plain lists; the covariate section keeps its dict shape because its
parts depend on what the model was trained on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

REPORT_FORMAT = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelMeasured(Record):
    """The audited model, from its public card."""

    dir_name: str
    generator: str
    training_inputs_digest: str
    preset: str | None
    recipe: dict[str, Any]
    image_size: int
    labels: list[str]
    dp: bool
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    statement: str


class StoreMeasured(Record):
    """The training store (exact counts: this report is internal)."""

    fingerprint: str
    n_train_patients: int
    n_holdout_patients: int
    n_train_slices: int
    n_holdout_slices: int


class CohortMeasured(Record):
    """The synthetic set the audit measured and how it was obtained."""

    per_label: int
    accepted: int
    reproduce: str
    source: str
    pipeline_stopped: bool = False
    finding: str | None = None
    generated: int | None = None
    rejected: int | None = None


class ClassifierScores(Record):
    accuracy: float
    accuracy_sd: float
    auc: float
    auc_sd: float
    per_seed: list[dict[str, float]]


class Ratio(Record):
    accuracy: float
    auc: float


class Utility(Record):
    """TRTR and TSTR on real held-out patients; ``tstr_small_n`` beside the fair protocol when it ran."""

    protocol: str
    classifier: str
    test_set: str
    trtr: ClassifierScores
    tstr: ClassifierScores
    ratio: Ratio
    tstr_small_n: ClassifierScores | None = None
    ratio_small_n: Ratio | None = None


class Frechet(Record):
    synthetic_vs_holdout: float
    train_vs_holdout: float
    ratio: float


class FrechetPair(Record):
    classifier_features: Frechet
    filter_embedding: Frechet
    feature_spaces: str


class MsSsim(Record):
    synthetic: dict[str, float]
    real: dict[str, float]
    meaning: str


class Intensity(Record):
    wasserstein: float
    edges: list[float]
    synthetic_density: list[float]
    real_density: list[float]


class Fidelity(Record):
    frechet: FrechetPair
    ms_ssim: MsSsim
    intensity: dict[str, Intensity]


class Canaries(Record):
    curves: dict[str, Any]
    documented: dict[str, Any]
    at_documented: dict[str, Any]
    covered_rejection: float
    worst: str
    not_covered: list[str]
    meaning: str


class FilterSection(Record):
    quantile: float
    holdout_acceptance_rate: float | None
    catch_rate_unfiltered: float
    catch_rate_by_label: dict[str, float]
    meaning: str
    canaries: Canaries


class Distances(Record):
    synthetic_filtered: list[float]
    synthetic_unfiltered: list[float]
    holdout: list[float]
    filter_threshold: float


class Dcr(Record):
    share_filtered: float
    share_unfiltered: float
    reference: str
    target: str
    distances_to_train: Distances


class Roc(Record):
    """A membership attack's ROC (per patient)."""

    auc: float
    tpr_at_low_fpr: float
    low_fpr: float
    n_members: int
    n_nonmembers: int
    fpr: list[float]
    tpr: list[float]
    attack: str | None = None  # the loss attack describes itself here
    radius: float | None = None  # the Monte-Carlo attack's distance radius


class MonteCarlo(Record):
    filtered: Roc
    unfiltered: Roc
    attack: str


class MembershipInference(Record):
    loss: Roc
    monte_carlo: MonteCarlo


class DpBound(Record):
    """The ceiling (ε, δ) puts on ANY membership attack; only ``statement`` for a model without DP."""

    private: bool
    statement: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    tpr_at_low_fpr: float | None = None
    tpr_at_low_fpr_card_pair_only: float | None = None
    auc: float | None = None
    auc_card_pair_only: float | None = None
    low_fpr: float | None = None
    privacy_curve: list[dict[str, float]] | None = None
    meaning: str | None = None


class Privacy(Record):
    filter: FilterSection
    dcr: Dcr
    membership_inference: MembershipInference
    dp_bound: DpBound


class AuditReport(Record):
    """Everything one audit measured; internal (computed from training data), never served."""

    format: int = REPORT_FORMAT
    created: str
    notice: str
    settings: dict[str, Any]
    model: ModelMeasured
    store: StoreMeasured
    cohort: CohortMeasured
    utility: Utility
    fidelity: Fidelity
    covariates: dict[str, Any] | None
    privacy: Privacy
    timings_s: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it (plain JSON types)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """``report.json``'s text."""
        return json.dumps(self.model_dump(), indent=2, default=_plain)


def _plain(value: object) -> object:
    """NumPy scalars and arrays inside the free-form parts (curves, covariates) as JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
