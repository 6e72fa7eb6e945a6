"""DP step vs non-private step for the 3-D denoiser (MONAI ``DiffusionModelUNet``, ``spatial_dims=3``).

    .venv/bin/python benchmarks/perf/bench_dp_step_3d.py --size 32 --batch 16 --repeats 3

For one physical batch of B patients (one volume each, K = 1): a non-private step (mean loss, one backward,
Adam) against the DP step the 2-D trainer ships (torch.func per-patient gradients + Opacus DPOptimizer), with
per-patient gradient norms checked against brute force on 2 patients. The seconds per patient give a first
estimate of what a ``cpu-3d`` preset can afford (issue: synthetic volumes).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from bench_dp_step import best_of, shipped_dp_step  # scripts run from benchmarks/, which Python puts on the path

from generators.diffusion import denoising_loss, noise_schedule, training_scheduler
from generators.diffusion_3d import build_unet_3d
from generators.unet import UNet3DSize
from train.per_patient_grads import brute_force_per_patient_grads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="volume edge in voxels (D = H = W)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels", default="16,32,32")
    parser.add_argument("--attention", default="0,0,1", help="attention per level, 0/1")
    args = parser.parse_args()
    size = UNet3DSize(
        channels=tuple(int(c) for c in args.channels.split(",")),
        attention_levels=tuple(a == "1" for a in args.attention.split(",")),
    )
    b, s = args.batch, args.size
    torch.manual_seed(0)
    model = build_unet_3d(n_classes=2, size=size)
    with torch.no_grad():  # MONAI zero-initialises the output layer; give every block a gradient
        for parameter in model.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0.0, 0.05)
    n_params = sum(p.numel() for p in model.parameters())
    alphas = noise_schedule(training_scheduler("sample"))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b, 1, 1, s, s, s, generator=gen) * 2 - 1  # (B, K=1, 1, D, H, W)
    labels = torch.randint(0, 3, (b, 1), generator=gen)
    timesteps = torch.randint(0, 1000, (b, 1), generator=gen)
    noise = torch.randn(b, 1, 1, s, s, s, generator=gen)
    params = dict(model.named_parameters())
    adam = torch.optim.Adam(params.values(), lr=1e-3)

    def non_private() -> None:
        adam.zero_grad()
        denoising_loss(model, images[:, 0], labels[:, 0], timesteps[:, 0], noise[:, 0], alphas, "sample").backward()
        adam.step()

    dp_step, grad_fn = shipped_dp_step(model, alphas, "sample", params, b, images, labels, timesteps, noise)

    base = best_of(non_private, args.repeats)
    ours = best_of(dp_step, args.repeats)
    reference = brute_force_per_patient_grads(model, alphas, "sample", images[:2], labels[:2], timesteps[:2], noise[:2])
    mine, _ = grad_fn({n: p.detach() for n, p in params.items()}, images[:2], labels[:2], timesteps[:2], noise[:2])

    def norms(grads: dict) -> torch.Tensor:
        return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)

    err = float(((norms(mine) - norms(reference)).abs() / norms(reference)).max())
    print(
        f"{machine_header()}; "
        f"3-D UNet {size.channels}, attention {size.attention_levels}: {n_params / 1e6:.3f} M parameters; "
        f"{s}³ volumes, batch {b} patients, K = 1\n"
    )
    print("| step | seconds | s per patient | × non-private | per-patient norms vs brute force (max rel. error) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| non-private (mean loss, Adam) | {base:.3f} | {base / b:.3f} | 1.00 | — |")
    print(
        f"| torch.func per-patient grads + Opacus DPOptimizer | {ours:.3f} | {ours / b:.3f} | "
        f"{ours / base:.2f} | {err:.1e} |"
    )


if __name__ == "__main__":
    main()
