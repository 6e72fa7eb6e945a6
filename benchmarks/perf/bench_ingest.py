"""Time the demo cohort generator and ingestion at full size.

    .venv/bin/python benchmarks/perf/bench_ingest.py --patients 1000 --workers 2

Writes into a temporary directory (about 2 GB for 1 000 patients) and prints one Markdown table row per
stage, ready for BENCHMARKS.md. Each row also splits the stage's CPU time between the main process and the
workers: the main process's share is work that more workers cannot spread, so ``total CPU / main-process CPU``
bounds the speed-up any number of workers can give (Amdahl), and the bytes written per second show when the
disk, not the CPUs, sets the pace.
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
from common import cpu_seconds, cpu_split, machine


def described(split: tuple[float, float]) -> str:
    main_s, workers_s = split
    return f"{main_s:.1f} s / {workers_s:.1f} s (≤ {(main_s + workers_s) / max(main_s, 1e-9):.1f}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="synthcohort-bench-"))
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        plan = make_demo_cohort(root / "raw", patients=args.patients, seed=0, workers=args.workers)
        demo_s, demo_cpu = time.perf_counter() - start, described(cpu_split(cpu))
        size_mb = sum(p.stat().st_size for p in (root / "raw").rglob("*") if p.is_file()) / 1e6

        start, cpu = time.perf_counter(), cpu_seconds()
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
        ingest_s, ingest_cpu = time.perf_counter() - start, described(cpu_split(cpu))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n_dicom = sum(1 for p in plan if p.dicom)
    where = f"{machine()}, {args.workers} workers"
    print(
        "| stage | patients | inputs | wall time | throughput | CPU main process / workers (speed-up bound) "
        "| machine | date |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| demo-data | {args.patients} | {args.patients} NIfTI + {n_dicom} DICOM series ({size_mb:.0f} MB, "
        f"{size_mb / demo_s:.0f} MB/s) | {demo_s:.1f} s | {args.patients / demo_s:.1f} patients/s | {demo_cpu} "
        f"| {where} | {date.today()} |"
    )
    print(
        f"| ingest ({args.size}px, {args.slices} slices) | {args.patients} | {result.report['inputs']['found']} "
        f"→ {result.store.n_slices} slices | {ingest_s:.1f} s | {result.report['inputs']['found'] / ingest_s:.1f} "
        f"inputs/s | {ingest_cpu} | {where} | {date.today()} |"
    )


if __name__ == "__main__":
    main()
