"""Threshold calibration for the memorization filter: pure functions over distances, no I/O.

Rule: an output is rejected when its distance to the nearest training image is below the ``q``-th
quantile of real held-out *patients'* nearest-training distances (a patient's distance is the smallest
over their slices), i.e. when it is closer to a training image than an unseen real patient comes. The
quantile rests on at least ``MIN_HOLDOUT_PATIENTS`` people. Scores (``distance / threshold``) are internal:
only accept/reject ever leaves the server.
"""

from __future__ import annotations

import numpy as np

from generators.errors import InvalidInput

MIN_HOLDOUT_PATIENTS = 50
STATEMENT = (
    "The memorization filter is defence in depth and is NOT part of the differential-privacy guarantee: "
    "it reads the private training and held-out images, so its accept/reject decisions, and which samples "
    "were released, are not covered by epsilon; the held-out patients who calibrate it are not protected by "
    "epsilon at all. A generated image is rejected when, after allowing for small rotations, zooms, shifts, "
    "flips and intensity changes, it is closer to some training image than {q:.0%} of real held-out (unseen) "
    "patients come. It "
    "catches copies and near-copies of single training images; it does not detect a sample that reveals a "
    "patient in other ways (for example a rare feature reproduced on a different anatomy), which is what "
    "epsilon bounds."
)


def per_patient(distances: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each patient's nearest-training distance: the smallest over their slices (one value per patient)."""
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    out = np.full(len(keys), np.inf)
    np.minimum.at(out, inverse, np.asarray(distances, dtype=np.float64))
    return out


def require_patients(n_patients: int, *, minimum: int = MIN_HOLDOUT_PATIENTS) -> None:
    """The threshold must not rest on a handful of people."""
    if n_patients < minimum:
        raise InvalidInput(
            f"the memorization filter needs at least {minimum} held-out patients to calibrate its threshold, "
            f"found {n_patients}; re-ingest with a larger --holdout (or more patients)"
        )


def threshold(holdout_distances: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of held-out (per-patient) nearest-training distances; must be positive."""
    if not 0.0 < quantile < 0.5:
        raise InvalidInput(f"quantile must be in (0, 0.5), got {quantile}")
    if len(holdout_distances) == 0:
        raise InvalidInput("no held-out images to calibrate on; ingest with --holdout > 0")
    value = float(np.quantile(holdout_distances, quantile))
    if value <= 0.0:
        raise InvalidInput(
            "held-out images duplicate training images (threshold 0): check that the split is by patient"
        )
    return value


def scores(distances: np.ndarray, threshold_value: float) -> np.ndarray:
    """Distance as a ratio of the threshold; accepted iff ``score >= 1``."""
    return np.asarray(distances, dtype=np.float64) / threshold_value


def cross_validated_acceptance(patient_distances: np.ndarray, quantile: float, *, seed: int = 0) -> float:
    """Share of held-out *patients* accepted, out of sample: calibrate on half of them, test on the rest.

    ``patient_distances`` has one row per patient (:func:`per_patient`): ``(P,)`` for one view, or ``(P, V)`` for
    V views, each thresholded at ``quantile / V`` (a patient passes when it passes every view). Two folds, each
    calibrating the other.
    """
    distances = np.asarray(patient_distances, dtype=np.float64)
    distances = distances[:, None] if distances.ndim == 1 else distances
    if len(distances) < 2:
        return float("nan")
    order = np.random.default_rng(seed).permutation(len(distances))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    per_view = quantile / distances.shape[1]
    accepted = 0
    for calibrate, test in (halves, halves[::-1]):
        thresholds = np.array([threshold(distances[calibrate, v], per_view) for v in range(distances.shape[1])])
        accepted += int(np.sum(np.all(distances[test] >= thresholds, axis=1)))
    return accepted / len(distances)
