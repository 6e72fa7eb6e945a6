"""Fidelity, diversity and distance-to-closest-record measures for a synthetic image set.

All images are ``[N, 1, H, W]`` float32 in [-1, 1]. Nothing here reads files or trains anything.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from generators.errors import InvalidInput
from privacy_filters.embeddings import Embedding, embed
from privacy_filters.nearest_neighbour import NearestNeighbourIndex

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
MS_SSIM_KERNEL = 7


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``."""
    if len(a) < 2 or len(b) < 2:
        raise InvalidInput("the Fréchet distance needs at least two feature vectors per set")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr √(Σa Σb) = Σ √λ over the eigenvalues of Σa Σb (real and ≥ 0 up to round-off: a product of PSD matrices)
    trace_root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).astype(np.complex128)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def ms_ssim_levels(size: int, kernel: int = MS_SSIM_KERNEL) -> int:
    """How many MS-SSIM scales an image of ``size`` pixels supports (torchmetrics' size rule), 1 … 5."""
    levels = 5
    while levels > 1 and (size < 2**levels or size // max(1, levels - 1) ** 2 <= kernel - 1):
        levels -= 1
    return levels


def mean_pairwise_ms_ssim(images: np.ndarray, *, pairs: int = 500, seed: int = 0) -> float:
    """Mean MS-SSIM over random pairs of distinct images of one set (lower = more diverse).

    Uses as many of the standard five scales as the image size allows (3 at 32 px), with the standard
    weights renormalised, a 7-pixel Gaussian window and the data range 2 of [-1, 1] images.
    """
    if len(images) < 2:
        raise InvalidInput("MS-SSIM diversity needs at least two images")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(images), size=pairs)
    second = (first + rng.integers(1, len(images), size=pairs)) % len(images)  # never the same image
    levels = ms_ssim_levels(images.shape[-1])
    weights = np.asarray(MS_SSIM_WEIGHTS[:levels])
    x = torch.from_numpy(np.asarray(images[first], dtype=np.float32)) + 1.0
    y = torch.from_numpy(np.asarray(images[second], dtype=np.float32)) + 1.0
    values = multiscale_structural_similarity_index_measure(
        x,
        y,
        kernel_size=MS_SSIM_KERNEL,
        betas=tuple((weights / weights.sum()).tolist()),
        data_range=2.0,
        reduction="none",
        normalize="relu",
    )
    return float(values.mean())


def nearest_distances(embedding: Embedding, database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact distance from each query to its nearest database image, minimised over the query's mirror image
    (the same rule as the memorization filter)."""
    index = NearestNeighbourIndex(embedding.dim, "flat")
    index.build(embed(embedding, database))
    direct, _ = index.search(embed(embedding, queries))
    mirror, _ = index.search(embed(embedding, queries, mirror=True))
    return np.minimum(direct, mirror)


def dcr_share(to_train: np.ndarray, to_holdout: np.ndarray) -> float:
    """Fraction of samples closer to the training set than to an equally large held-out set (ties count ½).

    About 0.5 when the generator does not favour its training patients; towards 1 when it copies them.
    """
    if len(to_train) != len(to_holdout) or len(to_train) == 0:
        raise InvalidInput("DCR share needs one train and one holdout distance per sample")
    closer = (to_train < to_holdout).astype(np.float64) + 0.5 * (to_train == to_holdout)
    return float(closer.mean())


def intensity_histogram(images: np.ndarray, *, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Density histogram of pixel values over [-1, 1]: ``(density [bins], edges [bins + 1])``."""
    density, edges = np.histogram(
        np.asarray(images, dtype=np.float32).ravel(), bins=bins, range=(-1.0, 1.0), density=True
    )
    return density, edges


def intensity_distance(a: np.ndarray, b: np.ndarray, *, max_values: int = 2_000_000, seed: int = 0) -> float:
    """1-Wasserstein distance between the pixel-value distributions of two image sets (subsampled)."""
    rng = np.random.default_rng(seed)
    va, vb = np.asarray(a, dtype=np.float32).ravel(), np.asarray(b, dtype=np.float32).ravel()
    if len(va) > max_values:
        va = rng.choice(va, max_values, replace=False)
    if len(vb) > max_values:
        vb = rng.choice(vb, max_values, replace=False)
    return float(stats.wasserstein_distance(va, vb))
