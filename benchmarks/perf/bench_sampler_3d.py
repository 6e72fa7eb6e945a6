"""3-D sampling speed against a FLOP bound, for any volume model bundle.

    .venv/bin/python benchmarks/perf/bench_sampler_3d.py --model bench_runs/cpu3d --n 8

Volumes/s at the card's default sampler (DPM-Solver++, guidance: two network passes per step), against a
bound = measured matmul FLOP/s ÷ (network forward FLOPs per volume × steps × 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from bench_sampler import matmul_flops_per_second
from torch.utils.flop_counter import FlopCounterMode

from generators.registry import load_generator
from generators.unet import null_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench_runs/cpu3d")
    parser.add_argument("--n", type=int, default=8, help="volumes per label")
    args = parser.parse_args()
    model = load_generator(args.model, device="cpu")
    options = model.sampling_options()
    counts = {label: args.n for label in model.label_ids}
    start = time.perf_counter()
    out = model.generate(labels=counts, seed=0, **options)
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        x = torch.randn(2, 1, *model.image_shape)
        model.predict(x, torch.tensor([10, 10]), torch.tensor([0, null_class(len(model.label_ids))]))
    per_forward = counter.get_total_flops() / 2
    peak = matmul_flops_per_second()
    passes = 2 if options["guidance"] != 1.0 else 1
    bound = peak / (per_forward * options["steps"] * passes)
    measured = len(out.images) / seconds
    print(
        f"{machine_header()}; "
        f"{len(out.images)} volumes of {'x'.join(map(str, model.image_shape))}; sampler {options}\n"
        f"network forward: {per_forward / 1e9:.2f} GFLOP per volume; measured matmul {peak / 1e9:.1f} GFLOP/s; "
        f"bound {bound:.2f} volumes/s; measured {measured:.3f} volumes/s ({measured / bound:.1%} of the bound); "
        f"{seconds / len(out.images):.1f} s per volume"
    )


if __name__ == "__main__":
    main()
