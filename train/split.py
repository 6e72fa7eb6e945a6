"""Patient-level train/holdout split, stratified by label."""

from __future__ import annotations

import numpy as np

from generators.errors import InvalidInput


def split_patients(label_of: dict[str, str], *, holdout: float, seed: int) -> dict[str, str]:
    """Assign every patient to ``train`` or ``holdout``; a patient never lands in both.

    Within each label, ``round(n * holdout)`` patients go to holdout (at least one when ``n >= 2`` and
    ``holdout > 0``, and never all of them), chosen by a seeded shuffle of the sorted patient keys.
    """
    if not 0.0 <= holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for label in sorted(set(label_of.values())):
        patients = sorted(p for p, lab in label_of.items() if lab == label)
        n = len(patients)
        n_holdout = min(max(round(n * holdout), 1), n - 1) if holdout > 0 and n >= 2 else 0
        chosen = set(rng.permutation(n)[:n_holdout].tolist())
        for i, patient in enumerate(patients):
            split[patient] = "holdout" if i in chosen else "train"
    return split
