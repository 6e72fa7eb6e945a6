"""Planted near-copies of training images: how a memorizing generator's outputs typically look.

Used by the calibration self-test, the test suite and the benchmarks. Every function takes and returns
``[N, 1, H, W]`` float32 images in [-1, 1] and is deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

CANARY_KINDS = ("exact", "shift", "flip", "noise", "contrast")


def _shift(images: np.ndarray, rng: np.random.Generator, max_px: int) -> np.ndarray:
    out = np.full_like(images, -1.0)
    for i, image in enumerate(images):
        dy, dx = rng.choice([s for s in range(-max_px, max_px + 1) if s != 0], size=2)
        h, w = image.shape[1:]
        src = image[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        out[i, :, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
    return out


def make_canaries(images: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
    """Near-copies of ``images``: ``exact``, ``shift`` (±1–2 px, background fill), ``flip`` (left-right),
    ``noise`` (Gaussian σ = 0.05), ``contrast`` (×0.9 or ×1.1, then ±0.1 brightness)."""
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float32)
    if kind == "exact":
        out = images.copy()
    elif kind == "shift":
        out = _shift(images, rng, 2)
    elif kind == "flip":
        out = images[..., ::-1].copy()
    elif kind == "noise":
        out = images + rng.normal(0.0, 0.05, images.shape).astype(np.float32)
    elif kind == "contrast":
        gain = rng.choice([0.9, 1.1], size=(len(images), 1, 1, 1))
        offset = rng.choice([-0.1, 0.1], size=(len(images), 1, 1, 1))
        out = images * gain + offset
    else:
        raise ValueError(f"unknown canary kind {kind!r}; choose one of {CANARY_KINDS}")
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def make_blends(images: np.ndarray, others: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """``weight · image + (1 - weight) · other``: partial memorization (reported, not required)."""
    return (weight * np.asarray(images) + (1.0 - weight) * np.asarray(others)).astype(np.float32)
