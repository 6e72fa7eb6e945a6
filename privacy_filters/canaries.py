"""Planted near-copies of training images: how a memorizing generator's outputs typically look.

A generative model that memorizes rarely reproduces a slice pixel for pixel; it reproduces it slightly moved,
turned, scaled, cropped, blurred, re-contrasted or deformed. Every transform here has a *strength* knob, so a
benchmark can draw rejection-versus-strength curves, and :data:`DOCUMENTED` fixes the strengths the filter
promises to reject (≥ 99 %). All functions take and return ``[N, 1, H, W]`` float32 images in [-1, 1]
(background -1) and are deterministic in ``seed``; directions (sign of a rotation, which side is cropped,
...) are drawn at random per image.

Strength units: ``rotate`` degrees; ``scale`` relative change (0.1 = ×0.9 or ×1.1); ``crop`` fraction of
each axis cut (split at random between its two edges) before resizing back; ``shift`` pixels at 32 px
(scaled with the image); ``blur`` Gaussian σ in pixels at 32 px; ``gamma`` relative change of the exponent on
[0, 1] intensities; ``contrast`` relative gain change (plus an offset of the same size); ``noise`` Gaussian σ
on [-1, 1]; ``elastic`` peak displacement in pixels at 32 px of a smooth random field; ``occlusion`` fraction
of the image area covered by one background-coloured rectangle; ``combined`` applies rotate, scale, shift,
gamma and noise at the given fraction of their reference strengths (``COMBINED_PARTS``).

The filter promises ≥ 99 % rejection at :data:`DOCUMENTED` strengths for every kind except those in
:data:`NOT_COVERED` (reported with their curves, not promised).

Volumes ``[N, 1, D, H, W]`` (3-D models) have the kinds in :data:`KINDS_3D`: exact and left-right flipped
copies, and shift (a random direction in 3-D), blur, gamma, contrast and noise at the same strengths.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from privacy_filters.near_copy import gaussian_blur

REFERENCE_SIZE = 32  # pixel-valued strengths are given at this size and scaled with the image

DOCUMENTED: dict[str, float] = {  # the strengths the filter is measured at (BENCHMARKS.md, audit, self-test)
    "rotate": 5.0,
    "scale": 0.10,
    "crop": 0.05,
    "shift": 2.0,
    "blur": 0.7,
    "gamma": 0.25,
    "contrast": 0.15,
    "noise": 0.05,
    "elastic": 0.5,
    "occlusion": 0.01,
    "combined": 0.25,
}
NOT_COVERED = ("occlusion",)  # measured and reported, but not promised: see docs/privacy.md
STRENGTH_GRID: dict[str, tuple[float, ...]] = {
    "rotate": (0.0, 2.5, 5.0, 7.5, 10.0, 15.0),
    "scale": (0.0, 0.05, 0.10, 0.15, 0.20),
    "crop": (0.0, 0.025, 0.05, 0.075, 0.10),
    "shift": (0.0, 1.0, 2.0, 3.0, 4.0),
    "blur": (0.0, 0.35, 0.7, 1.0, 1.5),
    "gamma": (0.0, 0.1, 0.25, 0.4, 0.6),
    "contrast": (0.0, 0.1, 0.15, 0.3, 0.5),
    "noise": (0.0, 0.025, 0.05, 0.1, 0.2),
    "elastic": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5),
    "occlusion": (0.0, 0.005, 0.01, 0.02, 0.03, 0.06),
    "combined": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5),
}


def _warp(images: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Apply per-image affine maps (output → input, normalised coordinates ``[N, 2, 3]``, or ``[N, 3, 4]`` for
    volumes), background fill."""
    x = torch.tensor(np.asarray(images, dtype=np.float32)) + 1.0  # a copy: the input may be a read-only map
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(x.shape), align_corners=False)
    return (F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0).numpy()


def _affine(n: int, *, angle_deg=0.0, scale=1.0, shift_x=0.0, shift_y=0.0) -> np.ndarray:
    """``[n, 2, 3]`` output→input maps for a rotation by ``angle`` and a zoom by ``scale`` about the centre, then a
    shift (normalised units). Arguments broadcast over images."""
    angle = np.deg2rad(np.broadcast_to(angle_deg, (n,)))
    inv = 1.0 / np.broadcast_to(scale, (n,))
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) * inv, -np.sin(angle) * inv
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) * inv, np.cos(angle) * inv
    theta[:, 0, 2], theta[:, 1, 2] = -np.broadcast_to(shift_x, (n,)), -np.broadcast_to(shift_y, (n,))
    return theta


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=n)


def _per_image(values: np.ndarray, images: np.ndarray) -> np.ndarray:
    """One value per image, shaped to broadcast over its channel and spatial axes."""
    return values.reshape(-1, *(1,) * (images.ndim - 1))


def _px(images: np.ndarray, pixels: float) -> float:
    """A reference-size pixel amount in this image's pixels."""
    return pixels * images.shape[-1] / REFERENCE_SIZE


def rotate(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _warp(images, _affine(len(images), angle_deg=strength * _signs(rng, len(images))))


def scale(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _warp(images, _affine(len(images), scale=1.0 + strength * _signs(rng, len(images))))


def crop(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Cut ``strength`` of the side (split at random between the two edges, per axis) and resize back."""
    n = len(images)
    offset_x, offset_y = rng.uniform(-strength, strength, size=(2, n))  # cut a on one edge, strength − a on the other
    return _warp(images, _affine(n, scale=1.0 / (1.0 - strength), shift_x=-offset_x, shift_y=-offset_y))


def shift(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    n, size = len(images), images.shape[-1]
    step = _px(images, strength) * 2.0 / size  # pixels → normalised units
    if images.ndim == 5:  # a random direction in 3-D
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        theta = np.concatenate([np.broadcast_to(np.eye(3), (n, 3, 3)), -step * direction[:, :, None]], axis=2)
        return _warp(images, theta)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    return _warp(images, _affine(n, shift_x=step * np.cos(angle), shift_y=step * np.sin(angle)))


def blur(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return gaussian_blur(x, _px(images, strength)).numpy()


def gamma(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    exponent = _per_image(1.0 + strength * _signs(rng, len(images)), images)
    unit = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    return unit**exponent * 2.0 - 1.0


def contrast(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A window change: gain ``1 ± strength`` and offset ``± strength`` on the whole image (then clipped)."""
    n = len(images)
    gain = _per_image(1.0 + strength * _signs(rng, n), images)
    offset = _per_image(strength * _signs(rng, n), images)
    return images * gain + offset


def noise(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return images + rng.normal(0.0, strength, images.shape).astype(np.float32)


def elastic(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement field (control grid 4 × 4, bicubic), peak ``strength`` reference pixels."""
    n, _, h, w = images.shape
    coarse = torch.from_numpy(rng.normal(size=(n, 2, 4, 4)).astype(np.float32))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)  # (N, 2, H, W)
    peak = field.abs().amax(dim=(1, 2, 3), keepdim=True) + 1e-6
    field = field / peak * (_px(images, strength) * 2.0 / w)
    base = F.affine_grid(torch.eye(2, 3).repeat(n, 1, 1), [n, 1, h, w], align_corners=False)
    grid = base + field.permute(0, 2, 3, 1)
    x = torch.tensor(np.asarray(images, dtype=np.float32)) + 1.0  # a copy: the input may be a read-only map
    return (F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0).numpy()


def occlusion(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One background-coloured rectangle of ``strength`` of the area, centred on a random foreground pixel."""
    out = images.copy()
    if strength <= 0:
        return out
    n, _, h, w = images.shape
    for i in range(n):
        area = strength * h * w
        rh = min(h, max(1, round(np.sqrt(area * rng.uniform(0.5, 2.0)))))
        rw = min(w, max(1, round(area / rh)))
        ys, xs = np.nonzero(images[i, 0] > -0.9)
        pick = rng.integers(len(ys)) if len(ys) else None
        cy, cx = (ys[pick], xs[pick]) if pick is not None else (h // 2, w // 2)
        top, left = int(np.clip(cy - rh // 2, 0, h - rh)), int(np.clip(cx - rw // 2, 0, w - rw))
        out[i, 0, top : top + rh, left : left + rw] = -1.0
    return out


def combined(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate, scale, shift, gamma and noise together, each at ``strength`` × its reference strength."""
    out = images
    for kind, reference in COMBINED_PARTS.items():
        out = TRANSFORMS[kind](out, strength * reference, rng)
    return out


COMBINED_PARTS = {"rotate": 5.0, "scale": 0.10, "shift": 2.0, "gamma": 0.25, "noise": 0.05}
TRANSFORMS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "rotate": rotate,
    "scale": scale,
    "crop": crop,
    "shift": shift,
    "blur": blur,
    "gamma": gamma,
    "contrast": contrast,
    "noise": noise,
    "elastic": elastic,
    "occlusion": occlusion,
    "combined": combined,
}


KINDS_3D = ("exact", "flip", "shift", "blur", "gamma", "contrast", "noise")


def transform(images: np.ndarray, kind: str, strength: float | None = None, *, seed: int = 0) -> np.ndarray:
    """A near-copy of each image under ``kind`` at ``strength`` (default: its documented strength)."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {kind!r}; choose one of {sorted(TRANSFORMS)}")
    if np.ndim(images) == 5 and kind not in KINDS_3D:
        raise ValueError(f"transform {kind!r} is 2-D only; volumes have {list(KINDS_3D)}")
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float32)
    value = DOCUMENTED[kind] if strength is None else float(strength)
    return np.clip(TRANSFORMS[kind](images, value, rng), -1.0, 1.0).astype(np.float32)


def make_canaries(images: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
    """Near-copies of ``images``: ``exact``, ``flip`` (left-right), or any :data:`TRANSFORMS` kind at its
    documented strength."""
    images = np.asarray(images, dtype=np.float32)
    if kind == "exact":
        return images.copy()
    if kind == "flip":
        return images[..., ::-1].copy()
    if kind in TRANSFORMS:
        return transform(images, kind, seed=seed)
    raise ValueError(f"unknown canary kind {kind!r}; choose exact, flip or one of {sorted(TRANSFORMS)}")


def make_blends(images: np.ndarray, others: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """``weight · image + (1 - weight) · other``: partial memorization (reported, not required)."""
    return (weight * np.asarray(images) + (1.0 - weight) * np.asarray(others)).astype(np.float32)
