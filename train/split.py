"""Patient-level train/holdout split, stratified by label, keyed with the store's secret."""

from __future__ import annotations

from collections.abc import Callable

from generators.errors import InvalidInput


def split_patients(label_of: dict[str, str], *, holdout: float, rank: Callable[[str], str]) -> dict[str, str]:
    """Assign every patient to ``train`` or ``holdout``; a patient never lands in both.

    Within each label, the ``round(n * holdout)`` patients with the lowest ``rank`` go to holdout (at least one
    when ``n >= 2`` and ``holdout > 0``, and never all of them). ``rank`` is a keyed hash of the patient
    (:meth:`train.deidentify.Pseudonymizer.split_rank`), so nobody without the store's secret can tell who is
    held out, and adding or removing one patient changes at most one other patient's assignment.
    """
    if not 0.0 <= holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1), got {holdout}")
    split: dict[str, str] = {}
    for label in sorted(set(label_of.values())):
        patients = sorted((p for p, lab in label_of.items() if lab == label), key=rank)
        n = len(patients)
        n_holdout = min(max(round(n * holdout), 1), n - 1) if holdout > 0 and n >= 2 else 0
        for i, patient in enumerate(patients):
            split[patient] = "holdout" if i < n_holdout else "train"
    return split
