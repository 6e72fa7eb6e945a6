"""From a 3-D scan to model-ready images: robust intensity scaling, then either 2-D axial slices resampled to a
square, or the whole volume resampled to an isotropic cube.

Orientation (the convention used everywhere downstream): an axial slice is an image ``[H, W]`` whose rows run
anterior→posterior (anterior at the top) and whose columns run from the patient's left to right (RAS voxel
axes: ``row = -j``, ``col = +i``); a volume ``[D, H, W]`` stacks such slices inferior→superior (``depth = +k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generators.errors import InvalidInput
from train.scan_io import Scan

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def robust_normalise(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to [-1, 1] using robust percentiles (background and outliers are clipped).

    The low end is the 0.5th percentile of all voxels; the high end the 99.5th percentile of voxels above
    it (the foreground), so a large empty background does not compress the tissue contrast.
    """
    lo = float(np.percentile(volume, LOW_PERCENTILE))
    foreground = volume[volume > lo]
    if foreground.size == 0:
        raise InvalidInput("the scan is blank (no intensity variation)")
    hi = float(np.percentile(foreground, HIGH_PERCENTILE))
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise InvalidInput("the scan is blank (no intensity variation)")
    scaled = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    return (scaled * 2.0 - 1.0).astype(np.float32)


@dataclass(frozen=True)
class Slab:
    """Slices (or one volume) taken from one scan.

    Attributes:
        images: ``[N, 1, size, size]`` slices, or ``[1, 1, size, size, size]`` for a volume; float32 in [-1, 1].
        positions: ``[N]`` slice offsets from the volume centre, in slices (0 = centre; ``[0]`` for a volume).
        spacing: ``(row_mm, col_mm, slice_mm)`` after resampling.
    """

    images: np.ndarray
    positions: np.ndarray
    spacing: tuple[float, float, float]


def axial_slices(scan: Scan, *, n_slices: int, size: int) -> Slab:
    """Take ``n_slices`` axial slices around the volume centre, resampled to ``size x size``.

    The slice's physical field of view is padded to a square (background value) before resampling, so
    anatomy keeps its aspect ratio; the new pixel spacing is ``field of view / size`` on both axes.
    """
    if n_slices < 1 or size < 8:
        raise InvalidInput(f"need n_slices >= 1 and size >= 8, got {n_slices} and {size}")
    if min(scan.data.shape[:2]) == 1 < scan.data.shape[2]:
        raise InvalidInput(
            "a single sagittal or coronal slice holds no axial slice; ingest axial series (or volumes) instead"
        )
    volume = robust_normalise(scan.data)
    sx, sy, sz = scan.spacing
    depth = volume.shape[2]
    take = min(n_slices, depth)
    start = depth // 2 - take // 2
    index = np.arange(start, start + take)
    slab = volume[:, :, index]  # (X, Y, n)
    images = np.ascontiguousarray(slab[:, ::-1, :].transpose(2, 1, 0))  # (n, H=Y reversed, W=X)

    height_mm, width_mm = images.shape[1] * sy, images.shape[2] * sx
    side_mm = max(height_mm, width_mm)
    new_h = max(1, round(size * height_mm / side_mm))
    new_w = max(1, round(size * width_mm / side_mm))
    tensor = torch.from_numpy(images)[:, None]  # (n, 1, H, W)
    antialias = new_h < images.shape[1] or new_w < images.shape[2]
    resized = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=antialias)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out = torch.full((take, 1, size, size), -1.0)
    out[:, :, top : top + new_h, left : left + new_w] = resized.clamp(-1.0, 1.0)
    pixel_mm = side_mm / size
    return Slab(images=out.numpy(), positions=index - depth // 2, spacing=(pixel_mm, pixel_mm, float(sz)))


def isotropic_volume(scan: Scan, *, size: int) -> Slab:
    """The whole scan on an isotropic ``size³`` grid in the volume convention above.

    The physical field of view is padded to a cube (background value) so anatomy keeps its proportions; the
    new voxel spacing is ``longest side / size`` on every axis.
    """
    if size < 8:
        raise InvalidInput(f"need size >= 8, got {size}")
    volume = robust_normalise(scan.data)
    display = np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0))  # (D=Z, H=Y reversed, W=X)
    sx, sy, sz = scan.spacing
    extent = (display.shape[0] * sz, display.shape[1] * sy, display.shape[2] * sx)
    side_mm = max(extent)
    shape = tuple(max(1, round(size * e / side_mm)) for e in extent)
    out = torch.full((1, 1, size, size, size), -1.0)
    d, h, w = ((size - n) // 2 for n in shape)
    out[..., d : d + shape[0], h : h + shape[1], w : w + shape[2]] = _resample(
        torch.from_numpy(display)[None, None], shape
    )
    pixel_mm = side_mm / size
    return Slab(images=out.numpy(), positions=np.zeros(1, dtype=np.int64), spacing=(pixel_mm, pixel_mm, pixel_mm))


def _resample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[N, 1, *spatial]`` → ``[N, 1, *shape]``: box-filtered where every axis shrinks (no aliasing), bilinear
    or trilinear otherwise (antialiased in 2-D); clamped to [-1, 1]."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    if len(shape) == 2:
        return F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False).clamp(-1.0, 1.0)
    if all(n <= m for n, m in zip(shape, x.shape[2:], strict=True)):
        return F.interpolate(x, size=shape, mode="area").clamp(-1.0, 1.0)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False).clamp(-1.0, 1.0)


def resize_images(images: np.ndarray, size: int) -> torch.Tensor:
    """``[N, 1, S, S]`` slices or ``[N, 1, S, S, S]`` volumes → the same at ``size`` per side (clamped to [-1, 1]).

    Training and the memorization filter both use this, so the filter sees images as the model does.
    """
    x = torch.tensor(np.asarray(images, dtype=np.float32))  # a copy: memory-mapped stores are read-only
    if x.dim() not in (4, 5):
        raise InvalidInput(f"expected [N, 1, H, W] or [N, 1, D, H, W] images, got shape {tuple(x.shape)}")
    return _resample(x, (size,) * (x.dim() - 2))


def resize_split(images: np.ndarray, size: int, *, chunk: int = 8192) -> np.ndarray:
    """:func:`resize_images` over a whole (memory-mapped) split, ``chunk`` images at a time."""
    if images.shape[-1] == size:
        return images
    out = np.empty((len(images), 1, *(size,) * (images.ndim - 2)), dtype=np.float32)
    for start in range(0, len(images), chunk):
        block = resize_images(images[start : start + chunk], size)
        out[start : start + len(block)] = block.numpy()
    return out
