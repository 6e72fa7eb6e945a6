"""DP step time vs non-private step time for the shipped model, and Opacus' per-sample modes for comparison.

    .venv/bin/python benchmarks/perf/bench_dp_step.py --preset cpu-small --batch 128 --repeats 5

For one physical batch of B patients (m slices each, K = 1): a non-private step of the same recipe (same
trainable parameter set; mean loss, one backward, Adam) against the DP step we ship (torch.func per-patient
gradients + Opacus DPOptimizer clip/noise/Adam), and, when every parameter is trained, Opacus'
own GradSampleModule in hooks and functorch modes. It also checks each mode's per-sample gradient norms
against brute force, with and without making conv inputs contiguous (the channels-last trap).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from generators.diffusion import denoising_loss, noise_schedule, training_scheduler
from generators.unet import build_unet, use_plain_attention
from train.per_patient_grads import brute_force_per_patient_grads, compile_grad_fn, make_per_patient_grad_fn
from train.presets import get_preset
from train.trainable import count_parameters, prepare_trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

warnings.filterwarnings("ignore")


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def shipped_dp_step(
    model, alphas, prediction, params: dict, batch_size: int, *batch, precision="fp32", compile_backend=None
):
    """The DP step the trainer ships: torch.func per-patient gradients of ``params`` on ``batch`` (images, labels,
    timesteps, noise) in ``precision``, compiled with ``compile_backend`` when given (``--compile``), then Opacus'
    DPOptimizer (clip, noise, Adam). Returns the step and the gradient function."""
    dp_opt = DPOptimizer(
        torch.optim.Adam(params.values(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )
    grad_fn = make_per_patient_grad_fn(model, alphas, prediction, precision=precision)
    if compile_backend:
        grad_fn = compile_grad_fn(grad_fn, model, backend=compile_backend)

    def dp_step() -> None:
        grads, _ = grad_fn({n: p.detach() for n, p in params.items()}, *batch)
        for name, p in params.items():
            p.grad_sample = grads[name]
        dp_opt.step()
        dp_opt.zero_grad()

    return dp_step, grad_fn


def contiguous_conv_inputs(model: torch.nn.Module) -> None:
    """Forward pre-hooks that make every Conv2d input contiguous (the fix for Opacus' hooks mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(lambda m, args: tuple(a.contiguous() for a in args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainable", default=None, help="trainable parameter set (default: the preset's)")
    parser.add_argument("--slices", type=int, default=None, help="m slices per patient (default: the preset's)")
    args = parser.parse_args()
    preset = get_preset(args.preset, trainable=args.trainable, slices_per_patient=args.slices)
    size, b, m = preset.image_size, args.batch, preset.slices_per_patient
    torch.manual_seed(0)
    alphas = noise_schedule(training_scheduler(preset.prediction))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b, m, 1, size, size, generator=gen) * 2 - 1
    labels = torch.randint(0, 3, (b, m), generator=gen)
    timesteps = torch.randint(0, 1000, (b, m), generator=gen)
    noise = torch.randn(b, m, 1, size, size, generator=gen)
    flat = (images.flatten(0, 1), labels.flatten(), timesteps.flatten(), noise.flatten(0, 1))

    model = build_unet(image_size=size, n_classes=2, size=preset.unet)
    use_plain_attention(model)
    trainable = prepare_trainable(model, preset.trainable, preset.lora_rank)
    n_trained, n_params = count_parameters(model)
    adam = torch.optim.Adam(trainable.values(), lr=1e-3)

    def non_private() -> None:
        adam.zero_grad()
        denoising_loss(model, *flat, alphas, preset.prediction).backward()
        adam.step()

    params = trainable
    dp_step, grad_fn = shipped_dp_step(model, alphas, preset.prediction, params, b, images, labels, timesteps, noise)

    base = best_of(non_private, args.repeats)
    ours = best_of(dp_step, args.repeats)
    print(
        f"{machine_header()}; "
        f"preset {preset.name}: {size} px, {n_trained / 1e6:.3f} of {n_params / 1e6:.2f} M parameters trained "
        f"({preset.trainable}), batch {b} patients × m = {m} slices, K = 1\n"
    )
    print("| step | seconds | × non-private | per-sample norms vs brute force (max rel. error) |")
    print("| --- | --- | --- | --- |")
    print(f"| non-private (mean loss, Adam) | {base:.3f} | 1.00 | — |")

    reference = brute_force_per_patient_grads(
        model, alphas, preset.prediction, images[:4], labels[:4], timesteps[:4], noise[:4]
    )
    ref_norms = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()], 1).norm(dim=1)
    ours_grads, _ = grad_fn(
        {n: p.detach() for n, p in params.items()}, images[:4], labels[:4], timesteps[:4], noise[:4]
    )
    ours_norms = torch.stack([g.flatten(1).norm(dim=1) for g in ours_grads.values()], 1).norm(dim=1)
    err = float(((ours_norms - ref_norms).abs() / ref_norms).max())
    print(
        f"| **shipped: torch.func per-patient grads + Opacus DPOptimizer** | {ours:.3f} | "
        f"{ours / base:.2f} | {err:.1e} |"
    )
    if preset.trainable != "all" or m != 1:
        return  # Opacus' own modes are compared for full training with one slice only

    for mode, fix in (("hooks", False), ("hooks", True), ("functorch", False)):
        torch.manual_seed(0)
        inner = build_unet(image_size=size, n_classes=2, size=preset.unet)
        use_plain_attention(inner)
        inner.load_state_dict(model.state_dict())
        if fix:
            contiguous_conv_inputs(inner)
        gsm = GradSampleModule(inner, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
        opt = DPOptimizer(
            torch.optim.Adam(gsm.parameters(), lr=1e-3),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=b,
            loss_reduction="sum",
        )

        def opacus_step(gsm=gsm, opt=opt) -> None:
            opt.zero_grad()
            per_sample = ((gsm(flat[0], flat[2], class_labels=flat[1]).sample - flat[3]) ** 2).flatten(1)
            per_sample.mean(dim=1).sum().backward()
            opt.step()

        seconds = best_of(opacus_step, args.repeats)
        opt.zero_grad()
        x4 = [t[:4] for t in flat]
        # Opacus' modes are checked on a simple per-sample MSE against one backward pass per sample
        noisy_out = ((gsm(x4[0], x4[2], class_labels=x4[1]).sample - x4[3]) ** 2).flatten(1).mean(dim=1).sum()
        noisy_out.backward()
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in gsm.parameters()], 1).norm(dim=1)
        brute = []
        for i in range(4):
            inner.zero_grad()
            (
                (inner(x4[0][i : i + 1], x4[2][i : i + 1], class_labels=x4[1][i : i + 1]).sample - x4[3][i : i + 1])
                ** 2
            ).mean().backward()
            brute.append(
                torch.stack([p.grad.flatten().norm() for p in inner.parameters() if p.grad is not None]).norm()
            )
        brute_t = torch.stack(brute)
        err = float(((norms - brute_t).abs() / brute_t).max())
        label = f"Opacus GradSampleModule {mode}" + (" + contiguous conv inputs" if fix else "")
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
