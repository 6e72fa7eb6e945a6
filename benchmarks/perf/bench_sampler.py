"""Sampler quality at the default (DPM-Solver++, 20 steps) vs 50-step DDIM, speed, and a FLOP bound.

    .venv/bin/python benchmarks/perf/bench_sampler.py --model demo/model --store demo/store --n 256

Quality: Fréchet distance to the real held-out slices in the memorization filter's embedding (no download
needed), for each solver, plus the per-pixel RMSE between samples of the two solvers started from the same
seeds (both integrate the same ODE, so a small RMSE means the fast solver lands where DDIM-50 does); the default
solver with its network under bf16 autocast is compared with the fp32 default the same way (``--precision``
rows: what sampling in bf16 on a GPU would cost in quality; on a CPU it is usually slower, not faster).
Speed: images/s at the default settings, against a bound = measured matmul FLOP/s ÷ (UNet forward FLOPs ×
steps × 2 for classifier-free guidance).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from generators.diffusion_2d import DiffusionModel
from privacy_filters.embeddings import embed, make_embedding
from privacy_filters.fidelity import frechet_distance
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def matmul_flops_per_second() -> float:
    x = torch.randn(2048, 2048)
    torch.mm(x, x)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(x, x)
    return 10 * 2 * 2048**3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo/model")
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--n", type=int, default=256, help="samples per label")
    args = parser.parse_args()
    model = DiffusionModel.load(args.model, device="cpu")
    store = CohortStore.open(args.store)
    size = model.image_size
    emb = make_embedding("aligned-pyramid", size)
    holdout = torch.from_numpy(np.array(store.read("holdout").images))  # a writable copy
    real = torch.nn.functional.interpolate(holdout, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)
    real_e = embed(emb, real.numpy())
    counts = {label: args.n for label in model.label_ids}

    results = {}
    for name, solver, steps, precision in (
        ("DPM-Solver++ 20 (default)", "dpmsolver++", 20, "fp32"),
        ("DPM-Solver++ 20, network in bf16", "dpmsolver++", 20, "bf16"),
        ("DDIM 50", "ddim", 50, "fp32"),
        ("UniPC 10", "unipc", 10, "fp32"),
    ):
        start = time.perf_counter()
        out = model.generate(labels=counts, seed=0, steps=steps, solver=solver, precision=precision)
        seconds = time.perf_counter() - start
        results[name] = (out.images, seconds, steps)

    base = results["DDIM 50"][0]
    print(
        f"{machine_header()}; "
        f"{len(base)} samples ({args.n} per label) vs {len(real)} real held-out slices at {size} px\n"
    )
    print("| sampler | FD to real held-out | RMSE vs DDIM 50 (same seeds) | RMSE vs the fp32 default | images/s |")
    print("| --- | --- | --- | --- | --- |")
    half = len(real_e) // 2
    reference = frechet_distance(real_e[:half], real_e[half:])
    print(f"| real vs real (held-out halves, reference) | {reference:.4f} | — | — | — |")
    default = results["DPM-Solver++ 20 (default)"][0]
    for name, (images, seconds, _) in results.items():
        fd = frechet_distance(embed(emb, images.numpy()), real_e)
        rmse = float(((images - base) ** 2).mean().sqrt())
        rmse_default = float(((images - default) ** 2).mean().sqrt())
        print(f"| {name} | {fd:.4f} | {rmse:.4f} | {rmse_default:.4f} | {len(images) / seconds:.1f} |")

    with FlopCounterMode(display=False) as counter:
        x = torch.randn(2, 1, size, size)
        model.unet(x, torch.tensor([10, 10]), class_labels=torch.tensor([0, 2]))
    flops_per_forward = counter.get_total_flops() / 2
    peak = matmul_flops_per_second()
    default_images, default_seconds, steps = results["DPM-Solver++ 20 (default)"]
    bound = peak / (flops_per_forward * steps * 2)
    measured = len(default_images) / default_seconds
    print(
        f"\nUNet forward: {flops_per_forward / 1e6:.1f} MFLOP per image; measured matmul {peak / 1e9:.1f} GFLOP/s; "
        f"bound at {steps} steps with guidance: {bound:.0f} images/s; measured {measured:.1f} images/s "
        f"({measured / bound:.1%} of the bound)"
    )


if __name__ == "__main__":
    main()
