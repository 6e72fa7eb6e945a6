"""How well the audit's 2-D classifier learns the label at its fixed budget, with global max or average pooling.

The design is chosen on the TRAINING patients only: a seeded fifth of them (by patient, never by slice) is held
back as a validation set, the classifier trains on the rest for its fixed budget (600 steps of 128), and the
accuracy and AUC on the validation patients are printed per classifier seed. ``--holdout`` also trains on the whole
training split and scores the store's held-out patients (the audit's TRTR), which no design choice may look at.

Runs on the demo store; it prints exact statistics of the store, so never run it on a hospital's store.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import nn

from privacy_filters import audit_classifier as clf
from train.preprocess import resize_split
from train.store import CohortStore


@contextlib.contextmanager
def pooling(kind: str) -> Iterator[None]:
    """Temporarily give the 2-D audit classifier a global ``max`` (the shipped design) or ``avg`` pool."""
    shipped = clf.SmallCNN

    class Pooled(shipped):
        def __init__(self, n_classes: int, spatial_dims: int = 2) -> None:
            super().__init__(n_classes, spatial_dims)
            self.body[3] = nn.AdaptiveMaxPool2d(1) if kind == "max" else nn.AdaptiveAvgPool2d(1)

    clf.SmallCNN = Pooled
    try:
        yield
    finally:
        clf.SmallCNN = shipped


def score(train_x, train_y, test_x, test_y, n_classes: int, seed: int, steps: int) -> clf.ClassifierScores:
    model = clf.train_classifier(train_x, train_y, n_classes, steps=steps, seed=seed)
    probs, _ = clf.predict(model, test_x)
    return clf.score(probs, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--pool", choices=["max", "avg"], action="append", required=True, help="repeat to compare")
    parser.add_argument("--seeds", type=int, default=6, help="classifier seeds 0..S-1")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--holdout", action="store_true", help="also score the held-out patients (TRTR)")
    args = parser.parse_args()

    store = CohortStore.open(args.store)
    n_classes = len(store.label_names)
    train = store.read("train")
    x = np.ascontiguousarray(resize_split(train.images, args.size), dtype=np.float32)
    y = np.asarray(train.labels)
    patients = np.asarray(train.patients)
    unique = np.unique(patients)
    validation = np.isin(patients, np.random.default_rng(99).permutation(unique)[: len(unique) // 5])
    if args.holdout:
        held = store.read("holdout")
        hx = np.ascontiguousarray(resize_split(held.images, args.size), dtype=np.float32)
        hy = np.asarray(held.labels)
    for kind in args.pool:
        with pooling(kind):
            accuracies = []
            for seed in range(args.seeds):
                val = score(x[~validation], y[~validation], x[validation], y[validation], n_classes, seed, args.steps)
                accuracies.append(val.accuracy)
                line = f"{kind} seed {seed}: validation accuracy {val.accuracy:.3f} AUC {val.auc:.3f}"
                if args.holdout:
                    trtr = score(x, y, hx, hy, n_classes, seed, args.steps)
                    line += f"; held-out (TRTR) accuracy {trtr.accuracy:.3f} AUC {trtr.auc:.3f}"
                print(line, flush=True)
            print(
                f"{kind}: validation accuracy {np.mean(accuracies):.3f} ± {np.std(accuracies, ddof=1):.3f}", flush=True
            )


if __name__ == "__main__":
    main()
