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

Volumes ``[N, 1, D, H, W]`` (3-D models) have the aligned pyramid in 3-D — a light blur, then intensities
mapped through the volume's own foreground quantiles (:func:`~privacy_filters.near_copy.quantile_intensities`:
an increasing change of intensity such as gamma, windowing or gain and offset moves the quantiles with the
voxels), centre-of-mass alignment on all three axes, z-scoring, blur and pooling to an ``8³`` grid — and
``pixels``; the near-copy view's rotation and zoom search is 2-D only.

None needs training, so none can leak anything beyond the index itself; all are deterministic.
All take ``[N, 1, H, W]`` (or ``[N, 1, D, H, W]``) float32 images in [-1, 1] and return ``[N, D]`` float32
embeddings whose Euclidean distances are comparable across images of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generators.errors import InvalidInput
from privacy_filters.near_copy import BLUR, canonicalise, gaussian_blur, quantile_intensities


def _zscore(x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) or (N, 1, D, H, W)
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + 1e-6)


def centre_of_mass_align(x: torch.Tensor) -> torch.Tensor:
    """Translate each image (or volume) so its foreground centre of mass sits at its centre.

    Foreground weight is ``x + 1`` (background is -1); the shift is sub-pixel and fills with background.
    """
    weight = (x + 1.0).clamp(min=0.0)[:, 0]  # (N, [D,] H, W)
    n, spatial = len(x), weight.shape[1:]
    total = weight.flatten(1).sum(dim=1) + 1e-6
    theta = torch.zeros(n, len(spatial), len(spatial) + 1, dtype=x.dtype, device=x.device)
    for axis, size in enumerate(spatial):
        others = tuple(d for d in range(1, len(spatial) + 1) if d != axis + 1)
        centre = (weight.sum(dim=others) * torch.arange(size, dtype=x.dtype, device=x.device)).sum(dim=1) / total
        row = len(spatial) - 1 - axis  # grid coordinates run (W, H[, D]): the last array axis first
        theta[:, row, row] = 1.0
        theta[:, row, -1] = (centre - (size - 1) / 2) * 2.0 / size  # normalised grid units
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


@dataclass(frozen=True)
class AlignedPyramid:
    """Centre-of-mass aligned, z-scored, blurred, average-pooled pixels or voxels (see module docstring)."""

    grid: int = 16
    blur_sigma: float = 0.5
    name: str = "aligned-pyramid"
    spatial_dims: int = 2

    @property
    def dim(self) -> int:
        return self.grid**self.spatial_dims

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 3:
            levels = quantile_intensities(gaussian_blur(images, BLUR * images.shape[-1] / 32))  # [0, 1]
            x = _zscore(centre_of_mass_align(levels * 2.0 - 1.0))
            x = gaussian_blur(x, self.blur_sigma)
            return F.adaptive_avg_pool3d(x, self.grid).flatten(1) / self.grid**1.5  # (N, grid³), unit-ish scale
        x = gaussian_blur(_zscore(centre_of_mass_align(images)), self.blur_sigma)
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1) / self.grid  # (N, grid²), unit-ish scale


@dataclass(frozen=True)
class Pixels:
    """Z-scored raw pixels (or voxels): the baseline."""

    size: int = 64
    name: str = "pixels"
    spatial_dims: int = 2

    @property
    def dim(self) -> int:
        return self.size**self.spatial_dims

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _zscore(images).flatten(1) / self.size ** (self.spatial_dims / 2)


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


EMBEDDINGS_3D = ("aligned-pyramid", "pixels")


def make_embedding(name: str, image_size: int, spatial_dims: int = 2) -> Embedding:
    """Build an embedding by name for images (``spatial_dims=3``: volumes) of ``image_size`` pixels per side."""
    if spatial_dims == 3 and name not in EMBEDDINGS_3D:
        raise InvalidInput(f"embedding {name!r} is 2-D only; volumes can use {list(EMBEDDINGS_3D)}")
    if name == "near-copy":
        return NearCopy(grid=min(32, image_size), pool=min(16, image_size))
    if name == "aligned-pyramid":
        return AlignedPyramid(grid=min(16 if spatial_dims == 2 else 8, image_size), spatial_dims=spatial_dims)
    if name == "pixels":
        return Pixels(size=image_size, spatial_dims=spatial_dims)
    raise InvalidInput(f"unknown embedding {name!r}; choose one of {list(EMBEDDINGS)}")


@torch.no_grad()
def embed(
    embedding: Embedding,
    images: np.ndarray,
    *,
    batch_size: int = 4096,
    mirror: bool = False,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Embed ``[N, 1, H, W]`` images or ``[N, 1, D, H, W]`` volumes in batches on ``device`` (works on memory
    maps); ``mirror`` flips them left-right first."""
    out = np.empty((len(images), embedding.dim), dtype=np.float32)
    if images.ndim == 5:
        batch_size = max(1, batch_size // images.shape[-1])  # about the same memory per batch as slices
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32)).to(device)
        if mirror:
            chunk = torch.flip(chunk, dims=(-1,))
        out[start : start + len(chunk)] = embedding(chunk).cpu().numpy()
    return out
