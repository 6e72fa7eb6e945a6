"""Exact per-patient gradients of the denoising loss, for DP-SGD clipping.

Each sampled patient contributes ``m`` of their slices, each seen under ``K`` (timestep, noise) draws; the
patient's loss is the mean over those ``m·K`` terms and its gradient is what gets clipped (noise
multiplicity, Dockhorn et al. 2023, "DPDM", extended to several slices of one patient). Only parameters with
``requires_grad`` get gradients; frozen ones enter the loss as constants.

Gradients come from ``torch.func``: ``vmap`` over patients of ``grad`` of the patient loss, which is
exact by construction (no per-layer hooks, so no dependence on activation memory layout) and is
checked against brute-force autograd in the test suite.

Two options serve the GPU path. ``precision="bf16"`` runs the network's forward and backward under bf16
autocast while the loss, the per-patient gradients (in the parameters' fp32), their norms, the clipping and
the noise stay fp32, so each clipped gradient's norm is still at most C. :func:`masked_pass` pads a pass of
``b`` patients to a fixed number of rows and zeroes the padded rows' gradients exactly, so every pass has
one shape (what ``torch.compile`` and CUDA graphs need) and adds nothing to the clipped sum;
:func:`compile_grad_fn` compiles the gradient function for that shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch.func import functional_call, grad_and_value, vmap

from generators.diffusion import Prediction, autocast_for, compile_for, denoising_loss
from generators.recipe_choices import Precision
from generators.unet import use_plain_upsampling


def make_per_patient_grad_fn(
    model: UNet2DModel,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
    weighting: str = "uniform",
    precision: Precision = "fp32",
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Return ``fn(params, images, labels, timesteps, noise) -> (grads, losses)`` for the trainable ``params``.

    Shapes (B patients, K terms each): ``images (B, K, 1, H, W)``, ``labels (B, K)``, ``timesteps (B, K)``,
    ``noise (B, K, 1, H, W)``; ``grads[name]`` is ``(B, *param.shape)`` in the parameters' dtype and
    ``losses`` is ``(B,)`` fp32, whatever ``precision`` the network runs in.
    """
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    device = next(model.parameters()).device

    def patient_loss(params, images, labels, timesteps, noise):
        def denoiser(x, t, class_labels):
            with autocast_for(device, precision):
                out = functional_call(model, (params, frozen, buffers), (x, t), {"class_labels": class_labels})
            return (out.sample if hasattr(out, "sample") else out).float()  # the loss in fp32

        return denoising_loss(
            denoiser, images, labels, timesteps, noise, alphas_cumprod, prediction, weighting=weighting
        )

    return vmap(grad_and_value(patient_loss), in_dims=(None, 0, 0, 0, 0))


def compile_grad_fn(
    grad_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    model: torch.nn.Module,
    backend: str = "inductor",
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``grad_fn`` (of :func:`make_per_patient_grad_fn` for ``model``) under ``torch.compile`` for one fixed
    shape (fixed-shape passes; :func:`generators.diffusion.compile_for`: CUDA graphs on a GPU, whose outputs
    :func:`masked_pass` copies out before the next call); the first call compiles (minutes on a CPU). The model's
    upsampling is switched to a form vmap can trace (:func:`generators.unet.use_plain_upsampling`: the same
    values)."""
    use_plain_upsampling(model)
    return compile_for(grad_fn, next(model.parameters()).device, backend)


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


def masked_pass(
    grad_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    params: dict[str, torch.Tensor],
    terms: tuple[torch.Tensor, ...],
    real: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-patient gradients of a padded pass: rows where ``real`` is False get exactly zero gradients (and
    loss), so after clipping they add nothing to the sum (a zero gradient stays zero under any clip factor).
    ``real`` is a ``(rows,)`` bool tensor on the terms' device; no host synchronisation."""
    grads, losses = grad_fn(params, *terms)
    masked = {name: torch.where(real.view(-1, *[1] * (g.dim() - 1)), g, 0.0) for name, g in grads.items()}
    return masked, torch.where(real, losses, 0.0)


def padded_ids(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (b ≤ rows patient indices) padded to ``rows`` with patient 0, and the ``(rows,)`` mask of the
    real ones. The padded rows are drawn like any other (one shape for every pass) and masked out."""
    if len(ids) > rows:
        raise ValueError(f"a pass of {len(ids)} patients does not fit {rows} rows")
    pad = torch.zeros(rows - len(ids), dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, pad]), torch.arange(rows, device=ids.device) < len(ids)
