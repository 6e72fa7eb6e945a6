"""The DDPM training objective as a pure function (no optimiser, no data loading, no privacy).

``noise_schedule`` returns the cumulative ᾱ_t of the diffusers scheduler the bundle ships, so training and
sampling share one schedule. ``denoising_loss`` is written for one patient's ``K`` draws so that
``torch.func.vmap`` can map it over patients (noise multiplicity, DPDM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import cast

import torch
from diffusers import DDPMScheduler, UNet2DModel

from generators.recipe_choices import LOSS_WEIGHTINGS, TIMESTEP_SAMPLING, Precision, Prediction

NUM_TRAIN_TIMESTEPS = 1000


def autocast_for(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision="bf16"``, else nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def compile_for(fn: Callable, device: torch.device | str, backend: str = "inductor") -> Callable:
    """``fn`` under ``torch.compile`` for fixed shapes. On a GPU inductor's code replays as CUDA graphs
    (``mode="reduce-overhead"``: one launch per call instead of one per kernel); a graph's outputs live in its
    memory pool until the next call overwrites them, so callers copy them out before calling again."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" and backend == "inductor" else None
    return torch.compile(fn, mode=mode, dynamic=False, backend=backend)


def loss_weights(abar: torch.Tensor, prediction: Prediction, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-draw weights of the squared error, shaped like ``abar``.

    ``uniform``: 1 (the plain MSE of the prediction target). ``min-snr`` (Hang et al. 2023): the ε-error weighted
    by min(SNR, γ)/SNR, written for the target predicted: min(SNR, γ) for x0, min(SNR, γ)/SNR for ε and
    min(SNR, γ)/(SNR + 1) for v, where SNR = ᾱ/(1 − ᾱ). It damps the noisiest levels, where every target is a
    blur, and caps the cleanest, so that no band of noise levels dominates the gradient.
    """
    if weighting == "uniform":
        return torch.ones_like(abar)
    if weighting != "min-snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    snr = abar / (1.0 - abar).clamp_min(1e-8)
    capped = snr.clamp(max=gamma)
    if prediction == "sample":
        return capped
    if prediction == "epsilon":
        return capped / snr.clamp_min(1e-8)
    return capped / (snr + 1.0)


def training_scheduler(prediction: Prediction = "v_prediction") -> DDPMScheduler:
    """The forward-noising schedule (cosine ᾱ, 1 000 steps); sampling schedulers are built from its config."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction,
        clip_sample=False,
    )


def noise_schedule(scheduler: DDPMScheduler) -> torch.Tensor:
    """ᾱ_t for t = 0 … T-1 as float32."""
    return scheduler.alphas_cumprod.to(torch.float32)


def draw_timesteps(
    shape: tuple[int, ...],
    n_timesteps: int,
    generator: torch.Generator,
    sampling: str = "uniform",
    mean: float = 0.0,
) -> torch.Tensor:
    """Integer timesteps in ``0 … n_timesteps-1`` drawn from ``generator``.

    ``uniform`` weighs every noise level alike (DDPM). ``logit-normal`` draws t/T = sigmoid(z), z ~ N(0, 1)
    (Esser et al. 2024): about three quarters of the draws fall in the middle half of the schedule, where the coarse
    content of an image (and its class) is decided, and every t keeps a non-zero probability. ``mean`` moves the
    focus: z ~ N(mean, 1), positive toward high noise (coarse layout), negative toward low noise (fine detail).
    """
    if sampling == "uniform":
        return torch.randint(0, n_timesteps, shape, generator=generator, device=generator.device)
    if sampling == "logit-normal":
        fraction = torch.sigmoid(torch.randn(shape, generator=generator, device=generator.device) + mean)
        return (fraction * n_timesteps).long().clamp_(0, n_timesteps - 1)
    raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {TIMESTEP_SAMPLING}")


def denoising_loss(
    model: UNet2DModel | Callable[..., object],
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
    *,
    per_draw: bool = False,
    weighting: str = "uniform",
) -> torch.Tensor:
    """Mean squared error of the denoiser over a batch of draws.

    Args:
        model: the denoiser, any callable ``model(x, t, class_labels=y)`` returning the prediction or an object
            with it in ``.sample`` (diffusers).
        images: clean images ``(K, 1, H, W)`` or volumes ``(K, 1, D, H, W)`` in [-1, 1] (one patient's K draws).
        labels: class ids ``(K,)`` (the null class where the label was dropped).
        timesteps: ``(K,)`` integer timesteps.
        noise: standard normal noise shaped like ``images``.
        per_draw: return one loss per draw ``(K,)`` instead of their mean (membership-inference audits).
        weighting: of each draw's squared error by its noise level (:func:`loss_weights`).
    Returns:
        A scalar: the loss averaged over the K draws and all pixels (or ``(K,)`` with ``per_draw``).
    """
    abar = alphas_cumprod[timesteps].view(-1, *[1] * (images.dim() - 1))  # (K, 1, 1, 1[, 1])
    noisy = abar.sqrt() * images + (1.0 - abar).sqrt() * noise
    if prediction == "epsilon":
        target = noise
    elif prediction == "sample":  # predict the clean image (x0)
        target = images
    else:  # v = √ᾱ·ε − √(1−ᾱ)·x0
        target = abar.sqrt() * noise - (1.0 - abar).sqrt() * images
    output = model(noisy, timesteps, class_labels=labels)
    predicted = cast(torch.Tensor, output.sample if hasattr(output, "sample") else output)
    squared = (predicted - target) ** 2 * loss_weights(abar, prediction, weighting)  # (K, 1, H, W[, D])
    return squared.flatten(1).mean(1) if per_draw else squared.mean()
