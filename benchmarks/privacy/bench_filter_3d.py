"""The 3-D memorization filter on planted 3-D canaries, and its rejection-versus-strength curves.

    .venv/bin/python benchmarks/privacy/bench_filter_3d.py --store demo/store3d --sizes 32,24,16

For each model grid size, the filter is built on the store's training volumes (resized like calibration does)
and calibrated on its held-out patients; the table gives held-out acceptance (2-fold by patient), the rejection
of every 3-D canary kind at its documented strength and of 0.8/0.2 blends, and the build time (embedding,
index, calibration and self-test). The curves sweep each kind's strength at the first size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from privacy_filters import MemorizationFilter
from privacy_filters.canaries import KINDS_3D, STRENGTH_GRID
from privacy_filters.memorization import rejection_curves
from train.preprocess import resize_split
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="demo/store3d")
    parser.add_argument("--sizes", default="32,24,16")
    parser.add_argument("--curve-volumes", type=int, default=256)
    args = parser.parse_args()
    store = CohortStore.open(args.store)
    if store.spatial_dims != 3:
        raise SystemExit(f"{args.store} holds slices; ingest with --dims 3")
    train, holdout = store.read("train"), store.read("holdout")
    print(f"{machine_header()}; store {store!r}\n")
    kinds = list(KINDS_3D)
    print(f"| grid | held-out accepted | {' | '.join(kinds)} | blend 0.8/0.2 | build s |")
    print("| --- " * (len(kinds) + 4) + "|")
    first = None
    for size in (int(s) for s in args.sizes.split(",")):
        train_images, holdout_images = resize_split(train.images, size), resize_split(holdout.images, size)
        start = time.perf_counter()
        filt = MemorizationFilter.build(train_images, holdout_images, holdout_groups=holdout.patients)
        seconds = time.perf_counter() - start
        r = filt.record
        by_kind = " | ".join(f"{r['canary_rejection_by_kind'][k]:.1%}" for k in kinds)
        print(
            f"| {size}³ | {r['holdout_acceptance_rate']:.1%} | {by_kind} | {r['blend_rejection_rate']:.1%} | "
            f"{seconds:.0f} |"
        )
        if first is None:
            first = (size, filt, train_images)
    size, filt, train_images = first
    pick = np.random.default_rng(0).choice(len(train_images), min(args.curve_volumes, len(train_images)), False)
    grid = {k: STRENGTH_GRID[k] for k in kinds if k in STRENGTH_GRID}
    curves = rejection_curves(filt, np.asarray(train_images[np.sort(pick)]), grid)
    print(f"\nrejection vs strength at {size}³ ({len(pick)} training volumes per point)\n")
    for kind, points in curves.items():
        print(f"- {kind}: " + ", ".join(f"{p['strength']:g} → {p['rejected']:.0%}" for p in points))


if __name__ == "__main__":
    main()
