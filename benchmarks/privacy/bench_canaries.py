"""Memorization filter against near-copies: rejection as each transform's strength grows, held-out acceptance,
query speed, for each filter (the default two views together, and each view alone).

    .venv/bin/python benchmarks/privacy/bench_canaries.py --store demo/store --size 32 --out benchmarks/figures

Builds the filter on the store's training slices resized to ``--size`` (the model's size; 32 for cpu-small),
calibrated at q = 0.05 on the held-out patients (per-patient quantile), then plants near-copies of ``--n``
random training slices for every transform in ``privacy_filters.canaries.STRENGTH_GRID`` and reports the share
rejected. Prints one markdown table per filter and writes ``canary_curves_<views>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from app.audit_report import canary_figure
from privacy_filters import MemorizationFilter
from privacy_filters.canaries import DOCUMENTED, STRENGTH_GRID
from privacy_filters.memorization import rejection_curves
from train.preprocess import resize_split
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("demo/store"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=300, help="training slices to copy per transform and strength")
    parser.add_argument(
        "--filters",
        default="near-copy,aligned-pyramid;near-copy;aligned-pyramid",
        help="filters separated by ';', each a comma-separated list of views",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    store = CohortStore.open(args.store)
    train, holdout = store.read("train"), store.read("holdout")
    train_images = resize_split(train.images, args.size)
    holdout_images = resize_split(holdout.images, args.size)
    sources = train_images[np.random.default_rng(0).choice(len(train_images), size=args.n, replace=False)]
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine_header())
    print(f"store: {len(train_images)} training and {len(holdout_images)} held-out slices at {args.size} px\n")
    for name in args.filters.split(";"):
        start = time.perf_counter()
        filt = MemorizationFilter.build(
            train_images, holdout_images, holdout_groups=holdout.patients, embedding=name, self_test=False
        )
        build = time.perf_counter() - start
        start = time.perf_counter()
        filt.distances(holdout_images[:1000])
        qps = min(1000, len(holdout_images)) / (time.perf_counter() - start)
        curves = rejection_curves(filt, sources, STRENGTH_GRID, seed=1)
        acceptance = filt.record["holdout_acceptance_rate"]
        print(f"### {name}: held-out patients accepted {acceptance:.1%} (2-fold), build {build:.0f} s, ", end="")
        print(f"{qps:.0f} queries/s")
        print("| transform | strengths → share rejected | at the documented strength |")
        print("| --- | --- | --- |")
        for kind, points in curves.items():
            cells = ", ".join(f"{p['strength']:g}: {p['rejected']:.0%}" for p in points)
            documented = next((p["rejected"] for p in points if p["strength"] == DOCUMENTED[kind]), float("nan"))
            print(f"| {kind} | {cells} | {documented:.1%} |")
        figure = args.out / f"canary_curves_{name.replace(',', '+')}.png"
        canary_figure(curves, acceptance, DOCUMENTED, figure, title=f"{name}: rejection vs strength ({args.size} px)")
        print(f"\nfigure: {figure}\n")


if __name__ == "__main__":
    main()
