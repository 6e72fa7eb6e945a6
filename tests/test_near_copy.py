"""The near-copy distance on inputs whose answer is known: invariances, robustness, and what it must not equate."""

import numpy as np
import pytest
import torch

from privacy_filters import near_copy as nc
from privacy_filters.canaries import DOCUMENTED, NOT_COVERED, STRENGTH_GRID, transform


def blob_images(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    """Head-like images: an elliptic 'brain' (tissue 0 … 1 with random bright and dark spots, a one-pixel edge)
    on a dark noisy background, as MR slices look after scaling to [-1, 1]; different for every image."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    images = []
    for _ in range(n):
        radius = np.sqrt((xs / rng.uniform(0.3, 0.36)) ** 2 + (ys / rng.uniform(0.38, 0.44)) ** 2)
        mask = 1 / (1 + np.exp((radius - 1) * size / 3))
        tissue = 0.5 + sum(
            rng.uniform(-0.5, 0.5) * np.exp(-(((xs - cx) ** 2 + (ys - cy) ** 2) / rng.uniform(0.003, 0.012)))
            for cx, cy in rng.uniform(-0.22, 0.22, size=(6, 2))
        )
        background = -0.95 + rng.normal(0, 0.02, (size, size))
        images.append(mask * tissue.clip(0, 1) + (1 - mask) * background)
    return np.asarray(images, dtype=np.float32).clip(-1, 1)[:, None]


def test_every_documented_strength_is_on_the_benchmark_grid() -> None:
    assert set(DOCUMENTED) == set(STRENGTH_GRID) and set(NOT_COVERED) <= set(DOCUMENTED)
    assert all(DOCUMENTED[kind] in STRENGTH_GRID[kind] for kind in DOCUMENTED)
    x = blob_images(3)
    for kind in DOCUMENTED:
        out = transform(x, kind, seed=1)
        assert out.shape == x.shape and out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
        if kind not in ("noise", "combined"):  # strength 0 is the identity (up to resampling round-off)
            np.testing.assert_allclose(transform(x, kind, 0.0, seed=1), x, atol=1e-5)


def test_intensity_normalisation_ignores_monotone_changes_but_not_others() -> None:
    x = torch.from_numpy(blob_images(4))
    base = nc.quantile_intensities(x)
    for changed in (((x + 1) / 2) ** 1.3 * 2 - 1, (x * 0.8 + 0.1).clamp(-1, 1)):  # gamma, window
        raw = ((changed - x) / 2).abs().mean()
        assert (nc.quantile_intensities(changed) - base).abs().mean() < 0.3 * raw
    inverted = -x  # not monotone increasing: a different image
    assert (nc.quantile_intensities(inverted) - base).abs().mean() > 0.2
    assert float(base.min()) == 0.0 and float(base.max()) <= 1.0


def test_otsu_splits_a_bimodal_histogram() -> None:
    x = torch.full((1, 1, 16, 16), -0.95)
    x[..., 4:12, 4:12] = 0.5
    threshold = float(nc.otsu_threshold(x)[0])
    assert -0.95 < threshold < 0.5


def test_the_pose_ignores_an_interior_hole_where_the_centre_of_mass_does_not() -> None:
    x = torch.from_numpy(blob_images(1))
    weights = nc.quantile_intensities(x)
    holed = weights.clone()
    holed[..., 12:18, 17:23] = 0.0  # a patch inside the right half disappears
    cx, _, extent = nc._pose(weights)
    hx, _, hextent = nc._pose(holed)
    total = weights[0, 0].sum()
    xs = (torch.arange(32) + 0.5) / 16 - 1
    com = (weights[0, 0].sum(0) * xs).sum() / total
    holed_com = (holed[0, 0].sum(0) * xs).sum() / holed[0, 0].sum()
    assert abs(float(hx - cx)) < 0.25 * abs(float(holed_com - com))
    assert abs(float(hextent / extent) - 1) < 0.05


def test_copies_under_documented_transforms_stay_closer_than_other_images() -> None:
    """Every covered transform of an image is nearer to it than any other image is (the filter's premise)."""
    images = blob_images(12, seed=3)
    canonical = nc.canonicalise(torch.from_numpy(images))
    library = nc.compared(canonical)  # (12, P)
    candidates = library[None].expand(len(images), -1, -1)
    others = []
    for i in range(len(images)):
        mask = torch.arange(len(images)) != i
        d, _ = nc.near_copy_distance(canonical[i : i + 1], library[mask][None])
        others.append(float(d[0]))
    exact, which = nc.near_copy_distance(canonical, candidates)
    assert torch.all(which == torch.arange(len(images))) and float(exact.max()) < 1e-3
    for kind in DOCUMENTED:
        if kind in NOT_COVERED:
            continue
        copies = nc.canonicalise(torch.from_numpy(transform(images, kind, seed=2)))
        d, which = nc.near_copy_distance(copies, candidates)
        assert torch.all(which == torch.arange(len(images))), kind
        assert float(d.max()) < min(others), kind
    mirrored = nc.canonicalise(torch.from_numpy(images[..., ::-1].copy()))
    d, which = nc.near_copy_distance(mirrored, candidates)
    assert torch.all(which == torch.arange(len(images))) and float(d.max()) < 1e-2


def test_the_robust_residual_ignores_a_small_local_outlier_but_not_a_global_change() -> None:
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(1, 256)).astype(np.float32))
    local = a.clone()
    local[0, :10] += 5.0  # 4 % of the pixels
    assert float(nc.robust_residual(local, a, 0.1)[0]) < 1e-3
    assert (
        float(nc.robust_residual(a + torch.from_numpy(rng.normal(size=(1, 256)).astype(np.float32)), a, 0.1)[0]) > 0.5
    )
    assert float(nc.robust_residual(a * 1.5 + 0.3, a, 0.1)[0]) == pytest.approx(0.0, abs=1e-4)  # gain and offset


def test_all_searched_views_resampled_at_once_equal_one_resampling_per_view() -> None:
    """search_views warps every view in one call (the views' grids side by side): the same values, view by view,
    as warping with each view's own grid."""
    canonical = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    search = nc.AlignmentSearch()
    views = nc.search_views(canonical, search)
    assert views.shape == (5, len(search.views()), (32 // nc.COMPARE_POOL) ** 2)
    zeros = torch.zeros(5)
    for v, (angle, zoom, mirror) in enumerate(search.views()):
        grid = nc._affine_grid(
            5, 32, cx=zeros, cy=zeros, zoom=zeros + zoom, angle_rad=zeros + angle * torch.pi / 180.0, mirror=mirror
        )
        warped = torch.nn.functional.grid_sample(
            canonical, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        assert torch.equal(views[:, v], nc.compared(warped)), (angle, zoom, mirror)


def test_embeddings_and_re_ranking_stay_on_the_device_of_their_input() -> None:
    """The GPU filter's contract, checked without a GPU: on PyTorch's meta device (shapes only) any tensor the
    code made on the CPU instead of the input's device would raise a device mismatch."""
    from privacy_filters.embeddings import make_embedding

    meta = torch.device("meta")
    slices, volumes = torch.empty(3, 1, 32, 32, device=meta), torch.empty(2, 1, 16, 16, 16, device=meta)
    near_copy = make_embedding("near-copy", 32)
    canonical = near_copy.canonical(slices)
    assert near_copy.pooled(canonical).device == meta
    candidates = torch.empty(3, 16, nc.compared(canonical).shape[1], device=meta)
    distance, best = nc.near_copy_distance(canonical, candidates)
    assert distance.shape == best.shape == (3,) and distance.device == meta
    for embedding, images in (
        (make_embedding("aligned-pyramid", 32), slices),
        (make_embedding("aligned-pyramid", 16, 3), volumes),
    ):
        assert embedding(images).shape == (len(images), embedding.dim) and embedding(images).device == meta
