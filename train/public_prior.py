"""A public anatomical prior: non-private pretraining on the MNI152 brain template before DP training.

The template (ICBM 2009a, shipped inside nilearn) is public data about no patient, so training on it
spends no privacy budget; DP-SGD then only has to learn what the cohort adds (its variation and the
label-specific findings). Slices are taken like ingestion takes them and augmented on the fly with random
affine and elastic warps, intensity gamma/scale and noise; they are trained as the *null* class because
they carry no label. Use it for brain MRI; pass ``--public-prior none`` for other anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from generators.diffusion import Prediction, denoising_loss
from train.preprocess import axial_slices
from train.scan_io import Scan

PUBLIC_PRIORS = ("mni152", "none")
DESCRIPTION = "MNI152 ICBM 2009a T1 template (public, shipped with nilearn), augmented axial slices"


@lru_cache(maxsize=1)
def load_template() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template on a 2 mm grid: ``(data [X, Y, Z] float32 in [0, 1], RAS affine)``."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    image = nib.as_closest_canonical(load_mni152_template(resolution=2))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    return data / float(data.max()), image.affine.copy()


def template_slices(image_size: int, n_slices: int = 16) -> torch.Tensor:
    """Central axial template slices, preprocessed like ingestion: ``(n_slices, 1, size, size)`` in [-1, 1]."""
    data, affine = load_template()
    return torch.from_numpy(axial_slices(Scan(data, affine), n_slices=n_slices, size=image_size).images)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine + smooth elastic warp, gamma and scale jitter, Gaussian noise. ``(B, 1, H, W)`` in [-1, 1]."""
    b, _, h, w = images.shape
    angle = (torch.rand(b, generator=generator) - 0.5) * np.deg2rad(16)
    scale = 0.9 + 0.2 * torch.rand(b, 2, generator=generator)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale[:, 0], -torch.sin(angle) * scale[:, 0]
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale[:, 1], torch.cos(angle) * scale[:, 1]
    theta[:, :, 2] = (torch.rand(b, 2, generator=generator) - 0.5) * 0.1
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    coarse = torch.randn(b, 2, 5, 5, generator=generator) * 0.03
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    x = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) / 2.0
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4)
    x = x.clamp(min=0.0) ** gamma * (0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=generator))
    x = x + 0.02 * torch.randn(x.shape, generator=generator)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def pretrain(
    model: UNet2DModel,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    alphas_cumprod: torch.Tensor,
    prediction: Prediction,
    null_label: int,
    seed: int,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """Non-private denoising training on augmented template slices (null class), in place.

    The learning rate follows a cosine decay to 10 %; the model ends holding the EMA of its iterates.
    """
    generator = torch.Generator().manual_seed(seed)
    slices = template_slices(model.config.sample_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(learning_rate, step, steps)
        pick = torch.randint(0, len(slices), (batch_size,), generator=generator)
        images = augment(slices[pick], generator).to(device)
        labels = torch.full((batch_size,), null_label, device=device)
        timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        loss = denoising_loss(model, images, labels, timesteps, noise, alphas_cumprod, prediction)
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
