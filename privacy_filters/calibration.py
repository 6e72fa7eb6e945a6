"""Threshold calibration for the memorization filter: pure functions over distances, no I/O.

Rule: an output is rejected when its distance to the nearest training image is below the ``q``-th
quantile of real held-out patients' nearest-training distances, i.e. when it is closer to a training
image than an unseen real patient typically is. The published score is ``distance / threshold``
(≥ 1 means accepted), which reveals neither the embedding space nor the neighbour.
"""

from __future__ import annotations

import numpy as np

from generators.errors import InvalidInput

STATEMENT = (
    "The memorization filter is defence in depth and is NOT part of the differential-privacy guarantee: "
    "it reads the private training and held-out images, so its accept/reject decisions are not covered by "
    "epsilon. A generated image is rejected when it is closer to some training image than {q:.0%} of real "
    "held-out (unseen) patients' images are to their nearest training image."
)


def threshold(holdout_distances: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of held-out nearest-training distances; must be positive."""
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


def acceptance_rate(distances: np.ndarray, threshold_value: float) -> float:
    return float(np.mean(scores(distances, threshold_value) >= 1.0)) if len(distances) else float("nan")


def cross_validated_acceptance(distances: np.ndarray, groups: np.ndarray, quantile: float, *, seed: int = 0) -> float:
    """Held-out acceptance estimated out of sample: calibrate on half the patients, test on the other half.

    Two folds split by ``groups`` (patient keys), so a patient's slices never calibrate their own test.
    """
    patients = np.unique(groups)
    if len(patients) < 2:
        return float("nan")
    order = np.random.default_rng(seed).permutation(patients)
    halves = (set(order[: len(order) // 2]), set(order[len(order) // 2 :]))
    accepted = total = 0
    for calibrate, test in (halves, halves[::-1]):
        in_calibrate = np.array([g in calibrate for g in groups])
        in_test = np.array([g in test for g in groups])
        t = threshold(distances[in_calibrate], quantile)
        accepted += int(np.sum(scores(distances[in_test], t) >= 1.0))
        total += int(in_test.sum())
    return accepted / total
