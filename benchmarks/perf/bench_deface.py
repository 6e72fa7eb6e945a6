"""Time ``ingest --deface``'s registration on heads that carry a face, and check what it removes.

    .venv/bin/python benchmarks/perf/bench_deface.py --heads 4

The heads are those of ``tests/test_deface.py``: pydeface's public head template moved by a known nod and shift,
resampled to 1.5 mm (112 x 160 x 160 voxels), intensities scaled and noised, so where the face truly is is known.
Prints one Markdown row per head (seconds, template fit, share of the face's tissue removed, share of the tissue
6 mm or more from the face kept) and their mean, under the machine header. The first head's time includes
loading the template (about 1 s, once per process, as in an ingest).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from train.deface import deface

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the synthetic heads of the deface tests
from common import machine_header
from test_deface import synthetic_head

MOTIONS = ((12.0, (4.0, 10.0, -8.0)), (-6.0, (0.0, 5.0, 0.0)), (0.0, (0.0, 0.0, 0.0)), (8.0, (-6.0, 0.0, 6.0)))


def measure(nod: float, shift: tuple[float, float, float], seed: int) -> tuple[float, float, float, float]:
    """(seconds, fit, face tissue removed, far tissue kept) for one head."""
    scan, face = synthetic_head(nod_degrees=nod, shift_mm=shift, seed=seed)
    start = time.perf_counter()
    result = deface(scan)
    seconds = time.perf_counter() - start
    removed = result.scan.data == result.scan.data.min()
    tissue = scan.data > 0.2 * np.percentile(scan.data, 99)
    far = binary_erosion(~face, iterations=4) & tissue
    kept = float((result.scan.data[far] == scan.data[far]).mean())
    return seconds, result.fit, float(removed[face & tissue].mean()), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=3, choices=range(1, len(MOTIONS) + 1))
    args = parser.parse_args()
    print(machine_header())
    print("| nod ° | shift mm | s | fit | face removed | far tissue kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for seed, (nod, shift) in enumerate(MOTIONS[: args.heads]):
        rows.append(measure(nod, shift, seed))
        seconds, fit, removed, kept = rows[-1]
        print(f"| {nod:g} | {shift} | {seconds:.1f} | {fit:.4f} | {removed:.2%} | {kept:.2%} |", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"| mean | | {mean[0]:.1f} | {mean[1]:.4f} | {mean[2]:.2%} | {mean[3]:.2%} |")


if __name__ == "__main__":
    main()
