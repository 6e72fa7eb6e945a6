"""Time the demo cohort generator and ingestion at full size.

    .venv/bin/python benchmarks/perf/bench_ingest.py --patients 1000 --workers 2

Writes into a temporary directory (about 2 GB for 1 000 patients) and prints one Markdown table row per
stage, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from train.demo_cohort import make_demo_cohort
from train.ingest import IngestOptions, ingest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="synthcohort-bench-"))
    try:
        start = time.perf_counter()
        plan = make_demo_cohort(root / "raw", patients=args.patients, seed=0, workers=args.workers)
        demo_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in (root / "raw").rglob("*") if p.is_file()) / 1e6

        start = time.perf_counter()
        result = ingest(
            root / "raw",
            root / "store",
            labels_path=root / "raw" / "labels.csv",
            options=IngestOptions(
                size=args.size,
                slices=args.slices,
                workers=args.workers,
                labels=("healthy", "lesion"),
                min_label_patients=1,
            ),
        )
        ingest_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n_dicom = sum(1 for p in plan if p.dicom)
    where = f"{machine()}, {args.workers} workers"
    print("| stage | patients | inputs | wall time | throughput | machine | date |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| demo-data | {args.patients} | {args.patients} NIfTI + {n_dicom} DICOM series ({size_mb:.0f} MB) "
        f"| {demo_s:.1f} s | {args.patients / demo_s:.1f} patients/s | {where} | {date.today()} |"
    )
    print(
        f"| ingest ({args.size}px, {args.slices} slices) | {args.patients} | {result.report['inputs']['found']} "
        f"→ {result.store.n_slices} slices | {ingest_s:.1f} s | {result.report['inputs']['found'] / ingest_s:.1f} "
        f"inputs/s | {where} | {date.today()} |"
    )


if __name__ == "__main__":
    main()
