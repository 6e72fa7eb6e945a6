"""Image embeddings for the nearest-neighbour memorization filter.

Three options are shipped and compared in BENCHMARKS.md on planted canaries (the filter's default uses the
first two together, see :mod:`privacy_filters.memorization`):

- ``near-copy``: the canonical image of :mod:`privacy_filters.near_copy` (quantile-normalised intensities,
  centred and zoomed by the mass's 5–95 % extents), average-pooled to 16 × 16. It finds candidates; the
  filter then re-ranks them with an aligned distance that also undoes small rotations and zooms.
- ``aligned-pyramid``: shift the foreground's centre of mass to the image centre (sub-pixel,
  bilinear), z-score the intensities, blur lightly (Gaussian, σ = 0.5 px) and average-pool to a 16 × 16
  grid (256 numbers). Centre-of-mass alignment undoes translations, z-scoring undoes contrast and
  brightness changes, pooling averages noise away. Horizontal flips are handled by the filter, which
  queries both an image and its mirror image.
- ``pixels``: z-scored raw pixels. Catches exact and noisy copies but not shifted ones.

None needs training, so none can leak anything beyond the index itself; all are deterministic.
All take ``[N, 1, H, W]`` float32 images in [-1, 1] and return ``[N, D]`` float32 embeddings whose
Euclidean distances are comparable across images of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generators.errors import InvalidInput
from privacy_filters.near_copy import canonicalise, gaussian_blur


def _zscore(x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


def centre_of_mass_align(x: torch.Tensor) -> torch.Tensor:
    """Translate each image so its foreground centre of mass sits at the image centre.

    Foreground weight is ``x + 1`` (background is -1); the shift is sub-pixel and fills with background.
    """
    weight = (x + 1.0).clamp(min=0.0)[:, 0]  # (N, H, W)
    n, h, w = weight.shape
    total = weight.sum(dim=(1, 2)) + 1e-6
    cy = (weight.sum(dim=2) * torch.arange(h, dtype=x.dtype)).sum(dim=1) / total
    cx = (weight.sum(dim=1) * torch.arange(w, dtype=x.dtype)).sum(dim=1) / total
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = (cx - (w - 1) / 2) * 2.0 / w  # normalised grid units
    theta[:, 1, 2] = (cy - (h - 1) / 2) * 2.0 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


@dataclass(frozen=True)
class AlignedPyramid:
    """Centre-of-mass aligned, z-scored, blurred, average-pooled pixels (see module docstring)."""

    grid: int = 16
    blur_sigma: float = 0.5
    name: str = "aligned-pyramid"

    @property
    def dim(self) -> int:
        return self.grid * self.grid

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _zscore(centre_of_mass_align(images))
        x = gaussian_blur(x, self.blur_sigma)
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1) / self.grid  # (N, grid²), unit-ish scale


@dataclass(frozen=True)
class Pixels:
    """Z-scored raw pixels: the baseline."""

    size: int = 64
    name: str = "pixels"

    @property
    def dim(self) -> int:
        return self.size * self.size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _zscore(images).flatten(1) / self.size


@dataclass(frozen=True)
class NearCopy:
    """Canonical images (see :mod:`privacy_filters.near_copy`) pooled to ``pool × pool`` for candidate search."""

    grid: int = 32
    pool: int = 16
    name: str = "near-copy"

    @property
    def dim(self) -> int:
        return self.pool * self.pool

    def canonical(self, images: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) → (N, 1, grid, grid)
        return canonicalise(images, grid=self.grid)

    def pooled(self, canonical: torch.Tensor) -> torch.Tensor:  # (N, 1, grid, grid) → (N, pool²)
        return F.adaptive_avg_pool2d(canonical, self.pool).flatten(1) / self.pool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.canonical(images))


Embedding = NearCopy | AlignedPyramid | Pixels
EMBEDDINGS = ("near-copy", "aligned-pyramid", "pixels")


def make_embedding(name: str, image_size: int) -> Embedding:
    """Build an embedding by name for images of ``image_size`` pixels."""
    if name == "near-copy":
        return NearCopy(grid=min(32, image_size), pool=min(16, image_size))
    if name == "aligned-pyramid":
        return AlignedPyramid(grid=min(16, image_size))
    if name == "pixels":
        return Pixels(size=image_size)
    raise InvalidInput(f"unknown embedding {name!r}; choose one of {list(EMBEDDINGS)}")


@torch.no_grad()
def embed(embedding: Embedding, images: np.ndarray, *, batch_size: int = 4096, mirror: bool = False) -> np.ndarray:
    """Embed ``[N, 1, H, W]`` images in batches (works on memory maps); ``mirror`` flips them first."""
    out = np.empty((len(images), embedding.dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
        if mirror:
            chunk = torch.flip(chunk, dims=(3,))
        out[start : start + len(chunk)] = embedding(chunk).numpy()
    return out
