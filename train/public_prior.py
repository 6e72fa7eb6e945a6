"""A public anatomical prior: non-private pretraining on the MNI152 brain template before DP training.

The template (ICBM 2009a, shipped inside nilearn) is public data about no patient, so training on it
spends no privacy budget; DP-SGD then only has to learn what the cohort adds (its variation and the
label-specific findings). Slices (or, for 3-D models, the whole volume) are taken like ingestion takes them and
augmented on the fly with random affine and elastic warps, intensity gamma/scale and noise; they are trained
as the *null* class because they carry no label. Use it for brain MRI; pass ``--public-prior none`` for other
anatomy.

Optionally (``public_anomaly_rate`` > 0, 2-D only) a share of the prior's slices also gets generic *focal
anomalies*: one or two soft-edged, irregular patches of a random intensity inside the brain, the kind of synthetic
anomaly that self-supervised anomaly detection trains on. They come from no patient and from no cohort's own
generator. No preset turns it on (its measurements: BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from generators.diffusion import Prediction, denoising_loss, draw_timesteps
from train.preprocess import axial_slices, isotropic_volume
from train.scan_io import Scan

PUBLIC_PRIORS = ("mni152", "none")
DESCRIPTION = {
    2: "MNI152 ICBM 2009a T1 template (public, shipped with nilearn), augmented axial slices",
    3: "MNI152 ICBM 2009a T1 template (public, shipped with nilearn), augmented whole volume",
}


@lru_cache(maxsize=1)
def load_template() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template on a 2 mm grid: ``(data [X, Y, Z] float32 in [0, 1], RAS affine)``."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    image = nib.as_closest_canonical(load_mni152_template(resolution=2))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    return data / float(data.max()), image.affine.copy()


def template_images(image_size: int, spatial_dims: int = 2, n_slices: int = 16) -> torch.Tensor:
    """The template preprocessed like ingestion: ``n_slices`` central axial slices ``(n, 1, size, size)``, or for
    ``spatial_dims=3`` the whole volume ``(1, 1, size, size, size)``; in [-1, 1]."""
    scan = Scan(*load_template())
    if spatial_dims == 3:
        return torch.from_numpy(isotropic_volume(scan, size=image_size).images)
    return torch.from_numpy(axial_slices(scan, n_slices=n_slices, size=image_size).images)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine + smooth elastic warp, gamma and scale jitter, Gaussian noise, for slices ``(B, 1, H, W)`` or
    volumes ``(B, 1, D, H, W)`` in [-1, 1]. Volumes rotate in the axial plane, like slices do."""
    b, dims, spatial = len(images), images.dim() - 2, images.shape[2:]
    angle = (torch.rand(b, generator=generator) - 0.5) * np.deg2rad(16)
    scale = 0.9 + 0.2 * torch.rand(b, dims, generator=generator)
    theta = torch.zeros(b, dims, dims + 1)  # grid axes are (W, H[, D]): rotate the first two
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale[:, 0], -torch.sin(angle) * scale[:, 0]
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale[:, 1], torch.cos(angle) * scale[:, 1]
    if dims == 3:
        theta[:, 2, 2] = scale[:, 2]
    theta[:, :, dims] = (torch.rand(b, dims, generator=generator) - 0.5) * 0.1
    grid = F.affine_grid(theta, [b, 1, *spatial], align_corners=False)
    coarse = torch.randn(b, dims, *(5,) * dims, generator=generator) * 0.03
    smooth = F.interpolate(
        coarse, size=tuple(spatial), mode="bicubic" if dims == 2 else "trilinear", align_corners=True
    )
    grid = grid + smooth.movedim(1, -1)
    x = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) / 2.0
    per_image = (b, *(1,) * (dims + 1))
    gamma = torch.exp((torch.rand(per_image, generator=generator) - 0.5) * 0.4)
    x = x.clamp(min=0.0) ** gamma * (0.85 + 0.3 * torch.rand(per_image, generator=generator))
    x = x + 0.02 * torch.randn(x.shape, generator=generator)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def add_focal_anomalies(images: torch.Tensor, generator: torch.Generator, rate: float) -> torch.Tensor:
    """Generic focal anomalies on slices ``(B, 1, H, W)`` in [-1, 1]: each slice, with probability ``rate``, gets
    one patch (a second with probability 0.3) — an ellipse of random size (4–16 % of the side), aspect and angle,
    its outline roughened by smooth noise and its edge soft — blended toward a random intensity in [-1, 1] with
    a random opacity, and only where the slice shows tissue. Slices left alone are returned unchanged."""
    b, _, h, w = images.shape
    out = images.clone()
    tissue = (images > -0.8).float()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    chosen = torch.rand(b, generator=generator) < rate
    for active in (chosen, chosen & (torch.rand(b, generator=generator) < 0.3)):
        weights = tissue.flatten(1) + 1e-6  # a slice with no tissue still draws a centre (and changes nothing)
        centre = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        cy, cx = (centre // w).float(), (centre % w).float()
        radius = (0.04 + 0.12 * torch.rand(b, 2, generator=generator)) * min(h, w)
        angle = torch.rand(b, generator=generator) * math.pi
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
        u, v = (dx * cos + dy * sin) / radius[:, 0, None, None], (-dx * sin + dy * cos) / radius[:, 1, None, None]
        rough = F.interpolate(torch.randn(b, 1, 4, 4, generator=generator), size=(h, w), mode="bicubic")[:, 0]
        distance = torch.sqrt(u**2 + v**2) + 0.25 * rough
        patch = torch.sigmoid((1.0 - distance) / 0.12) * tissue[:, 0]
        level = torch.rand(b, generator=generator) * 2.0 - 1.0
        opacity = 0.5 + 0.5 * torch.rand(b, generator=generator)
        alpha = (patch * (opacity * active)[:, None, None]).unsqueeze(1)
        out = out * (1.0 - alpha) + level[:, None, None, None] * alpha
    return out.clamp(-1.0, 1.0)


def pretrain(
    model: torch.nn.Module,
    *,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
    null_label: int,
    seed: int,
    device: torch.device,
    anomaly_rate: float = 0.0,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """Non-private denoising training on augmented public ``images`` (:func:`template_images`; null class), in
    place, with :func:`add_focal_anomalies` on a share ``anomaly_rate`` of them. The learning rate follows a cosine
    decay to 10 %; the model ends holding the EMA of its iterates.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(learning_rate, step, steps)
        pick = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = augment(images[pick], generator)
        if anomaly_rate > 0:
            batch = add_focal_anomalies(batch, generator, anomaly_rate)
        batch = batch.to(device)
        labels = torch.full((batch_size,), null_label, device=device)
        timesteps = draw_timesteps((batch_size,), len(alphas_cumprod), generator).to(device)  # uniform: every t
        noise = torch.randn(batch.shape, generator=generator).to(device)
        loss = denoising_loss(model, batch, labels, timesteps, noise, alphas_cumprod, prediction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))
            for name, p in model.named_parameters():
                ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        if progress:
            progress(step + 1, loss.item())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema[name])


def cosine_lr(base: float, step: int, total: int, floor: float = 0.1) -> float:
    """Cosine decay from ``base`` to ``floor · base`` over ``total`` steps (data-independent, so DP-safe)."""
    progress = min(1.0, step / max(1, total))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
