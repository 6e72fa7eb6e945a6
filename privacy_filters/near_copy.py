"""A near-copy distance: how far an image is from a training image after undoing small similarity transforms
and monotone intensity changes. Pure tensor functions, no I/O, no index.

1. :func:`canonicalise` puts every image in a canonical form:
   - intensities: a light Gaussian blur (σ = 0.8 px at 32 px), then a piecewise-linear map through the image's
     own foreground quantiles (foreground by Otsu's threshold): an increasing change of intensity (gamma,
     contrast, windowing) moves the quantiles with the pixels, so the canonical intensities barely change;
   - geometry: the image is centred on the midpoint of its mass's 5–95 % extents and zoomed so that the
     extent is a fixed fraction of the side (undoes shifts, zooms and crops; unlike a centre of mass it does
     not move when a patch inside the image changes);
   - resampled to a ``grid × grid`` image (32 × 32).
2. :func:`compared` pools the canonical image 2 × 2 and z-scores it: distances are measured on that vector
   (pixel noise averages out; patients differ in shapes larger than a pooled pixel).
3. :func:`near_copy_distance` searches a small set of rotations, zooms and the mirror image of the query
   (:class:`AlignmentSearch`), takes each candidate's best view by plain squared distance (one batched matrix
   product) and scores it with :func:`robust_residual`: the RMS residual after ignoring the largest 10 % of
   squared differences and refitting gain and offset. The distance is the smallest over the candidates.

The memorization filter uses the pooled canonical image as its fast embedding (to find candidates) and
:func:`near_copy_distance` to re-rank them. What it catches, at which strengths, is measured in BENCHMARKS.md
(``benchmarks/privacy/bench_canaries.py``); the same design carries over to 3-D (3-D extents, rotations about three
axes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLUR = 0.8  # Gaussian σ in pixels at 32 px, before intensities are normalised
COMPARE_POOL = 2  # distances are measured on the canonical image pooled 2 × 2 (16 × 16 at grid 32)
EXTENT_FRACTION = 0.6  # canonical 5–95 % extent of the mass, as a fraction of the image side
MAX_ZOOM = 1.5  # canonicalisation never zooms by more than this (or less than its inverse)


@dataclass(frozen=True)
class AlignmentSearch:
    """The residual transforms searched when comparing a query with candidates (after canonicalisation),
    and the share of pixels the robust residual ignores."""

    angles_deg: tuple[float, ...] = (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0)
    scales: tuple[float, ...] = (0.97, 1.0, 1.03)
    mirror: bool = True
    trim: float = 0.1

    def views(self) -> list[tuple[float, float, bool]]:
        """Every searched view as ``(angle, scale, mirror)``."""
        mirrors = (False, True) if self.mirror else (False,)
        return [(a, z, m) for m in mirrors for a in self.angles_deg for z in self.scales]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with edge replication over the spatial axes of ``(N, 1, H, W)`` images or
    ``(N, 1, D, H, W)`` volumes (the last axis first)."""
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    for axis in range(x.dim() - 1, 1, -1):
        pad = [0] * (2 * (x.dim() - 2))  # F.pad lists the last axis first
        pad[2 * (x.dim() - 1 - axis)] = pad[2 * (x.dim() - 1 - axis) + 1] = radius
        shape = [1] * x.dim()
        shape[axis] = -1
        x = conv(F.pad(x, pad, mode="replicate"), taps.view(shape))
    return x


def otsu_threshold(x: torch.Tensor, *, bins: int = 64) -> torch.Tensor:
    """Per-image Otsu threshold ``(N,)`` of ``(N, 1, H, W)`` images in [-1, 1] (background vs foreground).

    Otsu's split depends on the shape of the histogram, not on where its modes sit, so a monotone change of
    intensity moves the threshold with the pixels (and noisy backgrounds stay background).
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).clamp(-1.0, 1.0)
    index = ((flat + 1.0) / 2.0 * (bins - 1)).round().long()
    hist = torch.zeros(n, bins, dtype=flat.dtype, device=flat.device).scatter_add_(1, index, torch.ones_like(flat))
    centres = torch.linspace(-1.0, 1.0, bins, dtype=flat.dtype, device=flat.device)
    weight = hist.cumsum(1)
    mass = (hist * centres).cumsum(1)
    total_w, total_m = weight[:, -1:], mass[:, -1:]
    mean_low = mass / weight.clamp(min=1e-9)
    mean_high = (total_m - mass) / (total_w - weight).clamp(min=1e-9)
    between = weight * (total_w - weight) * (mean_low - mean_high) ** 2
    best = between[:, :-1].argmax(dim=1)
    return (centres[best] + centres[best + 1]) / 2.0


def quantile_intensities(x: torch.Tensor, *, knots: int = 9) -> torch.Tensor:
    """Map each image's intensities through its own foreground quantiles: a piecewise-linear, increasing map
    with the Otsu threshold ``→ 0``, the foreground's ``k/(knots+1)`` quantile ``→ k/(knots+1)`` and 1 ``→ 1``.

    An increasing change of intensity (gamma, contrast, windowing) moves the threshold and the quantiles with
    the pixels, so the result barely changes; unlike a full rank transform, noise in flat regions is not
    amplified (the map is linear between quantiles). ``x`` is ``(N, 1, H, W)`` in [-1, 1]; background → 0.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).clamp(-1.0, 1.0)
    background = otsu_threshold(x)[:, None]  # (N, 1)
    ordered, _ = torch.sort(flat, dim=1)
    n_background = (flat <= background).sum(dim=1)
    n_foreground = (flat.shape[1] - n_background).clamp(min=1)
    levels = torch.arange(1, knots + 1, dtype=flat.dtype, device=flat.device) / (knots + 1)
    at = n_background[:, None] + (levels[None, :] * (n_foreground[:, None] - 1)).round().long()
    quantiles = torch.gather(ordered, 1, at.clamp(max=flat.shape[1] - 1))  # (N, knots)
    xs = torch.cat([background, quantiles, torch.ones_like(background)], dim=1)
    xs = (
        torch.cummax(xs, dim=1).values + torch.arange(knots + 2, dtype=flat.dtype, device=flat.device) * 1e-6
    )  # strictly increasing
    ys = torch.cat([levels.new_zeros(1), levels, levels.new_ones(1)])
    clipped = torch.maximum(flat, background).contiguous()
    index = torch.searchsorted(xs, clipped).clamp(1, knots + 1)
    x0, x1 = torch.gather(xs, 1, index - 1), torch.gather(xs, 1, index)
    mapped = ys[index - 1] + (clipped - x0) / (x1 - x0) * (ys[index] - ys[index - 1])
    return mapped.clamp(0.0, 1.0).reshape_as(x)


def _marginal_quantiles(weights: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles (normalised coordinates) of per-image 1-D mass distributions ``(N, L)`` at ``levels``."""
    n, length = weights.shape
    cdf = weights.cumsum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    index = torch.searchsorted(cdf.contiguous(), levels.expand(n, -1).contiguous()).clamp(1, length - 1)
    c0, c1 = cdf.gather(1, index - 1), cdf.gather(1, index)  # mass up to the left / right edge of pixel ``index``
    position = index + (levels - c0) / (c1 - c0).clamp(min=1e-9)  # in pixel-edge units, 0 … length
    return position * 2.0 / length - 1.0


def _pose(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A robust centre ``(cx, cy)`` and size of each image's mass, in normalised coordinates.

    The centre is the midpoint of the 5th and 95th percentiles of the mass along each axis and the size is
    the mean 5–95 % extent: unlike the centre of mass and the radius of gyration, neither moves when a patch
    inside the image disappears (an occlusion) or when the image is cropped a little.
    """
    wgt = weights[:, 0]
    levels = torch.tensor([0.05, 0.95], dtype=wgt.dtype, device=wgt.device)
    qy = _marginal_quantiles(wgt.sum(dim=2), levels)
    qx = _marginal_quantiles(wgt.sum(dim=1), levels)
    size = ((qx[:, 1] - qx[:, 0]) + (qy[:, 1] - qy[:, 0])) / 2.0
    return (qx[:, 0] + qx[:, 1]) / 2.0, (qy[:, 0] + qy[:, 1]) / 2.0, size.clamp(min=1e-3)


def _affine_grid(
    n: int, size: int, *, cx, cy, zoom, angle_rad=None, mirror: bool = False, dtype=torch.float32
) -> torch.Tensor:
    """Sampling grid (output → input): output point ``p`` reads input ``c + R(angle)·M·p / zoom`` (on ``cx``'s
    device)."""
    cos = torch.ones(n, dtype=dtype, device=cx.device) if angle_rad is None else torch.cos(angle_rad)
    sin = torch.zeros(n, dtype=dtype, device=cx.device) if angle_rad is None else torch.sin(angle_rad)
    flip = -1.0 if mirror else 1.0
    theta = torch.zeros(n, 2, 3, dtype=dtype, device=cx.device)
    theta[:, 0, 0], theta[:, 0, 1] = flip * cos / zoom, -sin / zoom
    theta[:, 1, 0], theta[:, 1, 1] = flip * sin / zoom, cos / zoom
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def canonicalise(images: torch.Tensor, *, grid: int = 32) -> torch.Tensor:
    """``(N, 1, H, W)`` images in [-1, 1] → canonical ``(N, 1, grid, grid)`` images in [0, 1] (module docstring)."""
    x = images.float()
    normalised = quantile_intensities(gaussian_blur(x, BLUR * x.shape[-1] / 32))
    cx, cy, extent = _pose(normalised)
    zoom = (EXTENT_FRACTION * 2.0 / extent).clamp(1 / MAX_ZOOM, MAX_ZOOM)  # the normalised side is 2
    sampling = _affine_grid(len(x), grid, cx=cx, cy=cy, zoom=zoom)
    return F.grid_sample(normalised, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)


def compared(canonical: torch.Tensor) -> torch.Tensor:
    """What distances are measured on: the canonical image average-pooled by ``COMPARE_POOL`` (averages
    pixel noise away; patients differ in shapes larger than that), flattened and z-scored (absorbs what is
    left of a global intensity change): ``(N, (grid/pool)²)``."""
    x = F.avg_pool2d(canonical, COMPARE_POOL).flatten(1) if COMPARE_POOL > 1 else canonical.flatten(1)
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-6)


def search_views(canonical: torch.Tensor, search: AlignmentSearch) -> torch.Tensor:
    """Comparison vectors (:func:`compared`) of every searched view of each canonical image: ``(N, V, P)``.

    One resampling for all views: their fixed sampling grids sit side by side (:func:`_views_grid`), so the
    output holds the V warped images next to each other (the same values as one call per view)."""
    n, _, size, _ = canonical.shape
    grid = _views_grid(search, size, canonical.device, canonical.dtype)  # (1, size, V·size, 2)
    v = grid.shape[2] // size
    warped = F.grid_sample(
        canonical, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (N, 1, size, V·size)
    views = warped.view(n, size, v, size).transpose(1, 2).reshape(n * v, 1, size, size)
    return compared(views).view(n, v, -1)


@functools.lru_cache(maxsize=16)
def _views_grid(search: AlignmentSearch, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The sampling grids of every view of :func:`search_views` (they depend on no image), concatenated along the
    width: ``(1, size, V·size, 2)``; made once per search, size and device."""
    one = torch.zeros(1, dtype=dtype, device=device)
    grids = [
        _affine_grid(
            1,
            size,
            cx=one,
            cy=one,
            zoom=torch.full_like(one, zoom),
            angle_rad=torch.full_like(one, angle * torch.pi / 180.0),
            mirror=mirror,
            dtype=dtype,
        )
        for angle, zoom, mirror in search.views()
    ]
    return torch.cat(grids, dim=2)


def robust_residual(a: torch.Tensor, b: torch.Tensor, trim: float) -> torch.Tensor:
    """RMS of ``a − b`` over the last axis ignoring the ``trim`` share of largest squared differences, after
    refitting a gain and offset of ``a`` on the kept pixels (so an occlusion does not skew the z-scoring)."""
    p = a.shape[-1]
    kept = p - int(trim * p)
    if kept == p:
        return ((a - b) ** 2).mean(dim=-1).sqrt()
    keep = torch.zeros_like(a).scatter_(-1, torch.topk((a - b) ** 2, kept, dim=-1, largest=False).indices, 1.0)
    mean_a, mean_b = (a * keep).sum(-1, keepdim=True) / kept, (b * keep).sum(-1, keepdim=True) / kept
    cov = ((a - mean_a) * (b - mean_b) * keep).sum(-1, keepdim=True)
    var = (((a - mean_a) ** 2) * keep).sum(-1, keepdim=True).clamp(min=1e-9)
    fitted = mean_b + (a - mean_a) * (cov / var).clamp(0.5, 2.0)
    diff = (fitted - b) ** 2
    total = diff.sum(dim=-1) - torch.topk(diff, p - kept, dim=-1, largest=True, sorted=False).values.sum(dim=-1)
    return (total.clamp(min=0.0) / kept).sqrt()


def near_copy_distance(
    canonical: torch.Tensor, candidates: torch.Tensor, search: AlignmentSearch = AlignmentSearch()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The near-copy distance of each query to its closest candidate, and that candidate's position.

    Args:
        canonical: ``(Q, 1, g, g)`` canonical query images (:func:`canonicalise`).
        candidates: ``(Q, K, P)`` comparison vectors (:func:`compared`) of each query's candidates.
    Returns:
        ``(distance (Q,), best candidate (Q,))``: the robust residual at each candidate's best view (the view
        with the smallest plain squared distance, found with one batched matrix product), minimised over K.
    """
    views = search_views(canonical, search)  # (Q, V, P)
    squared = (
        (views**2).sum(-1)[:, None, :]
        + (candidates**2).sum(-1)[:, :, None]
        - 2.0 * torch.bmm(candidates, views.transpose(1, 2))
    )  # (Q, K, V)
    best_view = squared.argmin(dim=-1)  # (Q, K)
    chosen = torch.gather(views, 1, best_view[..., None].expand(-1, -1, views.shape[-1]))  # (Q, K, P)
    distance = robust_residual(chosen, candidates, search.trim)  # (Q, K)
    best = distance.argmin(dim=1)
    return distance[torch.arange(len(best), device=best.device), best], best
