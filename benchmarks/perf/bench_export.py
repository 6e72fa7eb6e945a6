"""Cohort pipeline throughput: pipeline samples/s vs the raw sampler, and local worker scaling.

    .venv/bin/python benchmarks/perf/bench_export.py --model demo/model --n 500

Raw sampler: ``DiffusionModel.generate`` alone at the default settings (batch 64). Pipeline: the full
generate → filter → write (NIfTI) → manifest path of ``build_cohort`` for the same number of samples,
with 1 and 2 local worker processes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from app.pipeline import CohortRequest, build_cohort, local_runner
from generators.diffusion_2d import DiffusionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo/model")
    parser.add_argument("--n", type=int, default=500, help="samples per label")
    args = parser.parse_args()
    model_dir = Path(args.model)
    model = DiffusionModel.load(model_dir, device="cpu")
    counts = {label: args.n for label in model.label_ids}
    total = sum(counts.values())

    start = time.perf_counter()
    model.generate(labels=counts, seed=0)
    raw = total / (time.perf_counter() - start)
    print(f"{machine_header()}; {total} samples at {model.image_size} px\n")
    print("| path | workers | wall time | samples/s | ratio to raw sampler |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| raw sampler (generate only) | 1 process | {total / raw:.1f} s | {raw:.1f} | 1.00 |")
    for workers in (1, 2):
        root = Path(tempfile.mkdtemp(prefix="synthcohort-export-"))
        try:
            runner = local_runner(model_dir, workers, "cpu") if workers > 1 else None
            start = time.perf_counter()
            manifest = build_cohort(
                model_dir, CohortRequest(counts=counts, seed=0), root / "cohort", runner=runner, device="cpu"
            )
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(root, ignore_errors=True)
        speed = len(manifest["samples"]) / seconds
        print(
            f"| build_cohort (generate → filter → NIfTI + manifest) | {workers} | {seconds:.1f} s | {speed:.1f} | "
            f"{speed / raw:.2f} |"
        )


if __name__ == "__main__":
    main()
