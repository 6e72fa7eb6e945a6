"""Exact per-patient gradients of the denoising loss, for DP-SGD clipping.

Each sampled patient contributes ``m`` of their slices, each seen under ``K`` (timestep, noise) draws; the
patient's loss is the mean over those ``m·K`` terms and its gradient is what gets clipped (noise
multiplicity, Dockhorn et al. 2023, "DPDM", extended to several slices of one patient). Only parameters with
``requires_grad`` get gradients; frozen ones enter the loss as constants.

Gradients come from ``torch.func``: ``vmap`` over patients of ``grad`` of the patient loss, which is
exact by construction (no per-layer hooks, so no dependence on activation memory layout) and is
checked against brute-force autograd in the test suite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch.func import functional_call, grad_and_value, vmap

from generators.diffusion import Prediction, denoising_loss


def make_per_patient_grad_fn(
    model: UNet2DModel, alphas_cumprod: torch.Tensor, prediction: Prediction, weighting: str = "uniform"
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Return ``fn(params, images, labels, timesteps, noise) -> (grads, losses)`` for the trainable ``params``.

    Shapes (B patients, K terms each): ``images (B, K, 1, H, W)``, ``labels (B, K)``, ``timesteps (B, K)``,
    ``noise (B, K, 1, H, W)``; ``grads[name]`` is ``(B, *param.shape)`` and ``losses`` is ``(B,)``.
    """
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}

    def patient_loss(params, images, labels, timesteps, noise):
        def denoiser(x, t, class_labels):
            return functional_call(model, (params, frozen, buffers), (x, t), {"class_labels": class_labels})

        return denoising_loss(
            denoiser, images, labels, timesteps, noise, alphas_cumprod, prediction, weighting=weighting
        )

    return vmap(grad_and_value(patient_loss), in_dims=(None, 0, 0, 0, 0))


def brute_force_per_patient_grads(
    model: UNet2DModel,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weighting: str = "uniform",
) -> dict[str, torch.Tensor]:
    """Reference implementation: one ordinary backward pass per patient (slow; for tests)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in trainable}
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = denoising_loss(
            model, images[i], labels[i], timesteps[i], noise[i], alphas_cumprod, prediction, weighting=weighting
        )
        loss.backward()
        for name, p in trainable.items():
            out[name].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(grads) for name, grads in out.items()}
