"""The audit's measures on inputs whose answer is known: attacks, the DP ceiling, FD, MS-SSIM, DCR, classifier."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_card

from generators.diffusion import noise_schedule, training_scheduler
from generators.diffusion_2d import DiffusionModel
from generators.errors import InvalidInput
from generators.unet import UNetSize, build_unet
from privacy_filters import audit_classifier as clf
from privacy_filters import fidelity
from privacy_filters import membership_inference as mia
from privacy_filters.embeddings import make_embedding


def test_attack_roc_separable_reversed_and_random() -> None:
    rng = np.random.default_rng(0)
    perfect = mia.attack_roc(np.arange(100) + 1000.0, np.arange(100.0))
    assert perfect["auc"] == 1.0 and perfect["tpr_at_low_fpr"] == 1.0
    reversed_ = mia.attack_roc(np.arange(100.0), np.arange(100) + 1000.0)
    assert reversed_["auc"] == 0.0 and reversed_["tpr_at_low_fpr"] == 0.0
    chance = mia.attack_roc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(chance["auc"] - 0.5) < 0.03 and chance["tpr_at_low_fpr"] < 0.04
    shifted = mia.attack_roc(rng.normal(1.0, size=4000), rng.normal(size=4000))
    assert abs(shifted["auc"] - 0.760) < 0.02  # Φ(1/√2) for unit-variance Gaussians one σ apart
    with pytest.raises(InvalidInput):
        mia.attack_roc(np.array([]), np.array([1.0]))


def test_dp_bound_closed_forms() -> None:
    assert float(mia.dp_tpr_bound(0.01, [(0.0, 0.0)])) == pytest.approx(0.01)  # ε = 0: no test beats chance
    assert mia.dp_auc_bound([(0.0, 0.0)]) == pytest.approx(0.5, abs=1e-6)
    assert float(mia.dp_tpr_bound(0.01, [(1.0, 1e-5)])) == pytest.approx(math.e * 0.01 + 1e-5)
    # the tightest pair on a curve wins; a larger ε never lowers the ceiling
    curve = [(8.0, 1e-5), (2.0, 0.3)]
    assert float(mia.dp_tpr_bound(0.01, curve)) == pytest.approx(min(1.0, math.exp(2) * 0.01 + 0.3))
    aucs = [mia.dp_auc_bound([(eps, 1e-5)]) for eps in (0.1, 0.5, 1.0, 4.0, 8.0)]
    assert aucs == sorted(aucs) and aucs[-1] < 1.0
    # the upper branch 1 − e^(−ε)(1 − δ − FPR) binds at large FPR
    assert float(mia.dp_tpr_bound(0.9, [(1.0, 0.0)])) == pytest.approx(1 - math.exp(-1) * 0.1)


def test_monte_carlo_attack_finds_copied_members() -> None:
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    generated = np.concatenate([members + 0.01 * rng.normal(size=members.shape), rng.normal(size=(50, 8))])
    scores, radius = mia.monte_carlo_scores(np.concatenate([members, nonmembers]), generated, quantile=0.01)
    assert radius > 0
    assert mia.attack_roc(scores[:50], scores[50:])["auc"] > 0.95
    ids, means = mia.per_patient(np.array([1.0, 3.0, 10.0]), np.array(["a", "a", "b"]))
    assert ids.tolist() == ["a", "b"] and means.tolist() == [2.0, 10.0]


def test_loss_attack_separates_memorized_images() -> None:
    """A tiny UNet trained to memorize 4 images denoises them far better than 4 unseen ones."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(8, 1, 16, 16)).astype(np.float32)
    labels = np.zeros(8, dtype=np.int64)
    unet = build_unet(
        image_size=16,
        n_classes=1,
        size=UNetSize(block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=4),
    )
    alphas = noise_schedule(training_scheduler("sample"))
    optimiser = torch.optim.Adam(unet.parameters(), lr=3e-3)
    members = torch.from_numpy(images[:4])
    for _ in range(50):
        t = torch.randint(0, 1000, (4,))
        loss = mia_loss(unet, members, t, alphas)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model = DiffusionModel(unet, training_scheduler("sample").config, tiny_card(image_size=16, labels=("a",)))
    losses = model.membership_losses(images, labels, timesteps=(100, 300), seed=0, batch_size=3)
    assert losses.shape == (2, 8)
    scores = mia.loss_scores(losses)
    assert mia.attack_roc(scores[:4], scores[4:])["auc"] == 1.0


def mia_loss(unet, x: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    from generators.diffusion import denoising_loss

    return denoising_loss(unet, x, torch.zeros(len(x), dtype=torch.long), t, torch.randn_like(x), alphas, "sample")


def test_per_draw_loss_matches_the_mean() -> None:
    from generators.diffusion import denoising_loss

    unet = build_unet(
        image_size=16,
        n_classes=1,
        size=UNetSize(block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=4),
    )
    x, noise = torch.rand(5, 1, 16, 16) * 2 - 1, torch.randn(5, 1, 16, 16)
    args = (x, torch.zeros(5, dtype=torch.long), torch.arange(5) * 100, noise, noise_schedule(training_scheduler()))
    with torch.no_grad():
        per_draw = denoising_loss(unet, *args, "v_prediction", per_draw=True)
        mean = denoising_loss(unet, *args, "v_prediction")
    assert per_draw.shape == (5,)
    assert torch.allclose(per_draw.mean(), mean, rtol=1e-5)


def test_frechet_distance_known_values() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + np.array([3.0, 0, 0, 0])
    assert fidelity.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.frechet_distance(a, b) == pytest.approx(9.0, rel=0.03)
    c = rng.normal(size=(20000, 4)) * 2.0  # covariance 4·I: trace term 4·(1 + 4 − 2·2) = 4
    assert fidelity.frechet_distance(a, c) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(InvalidInput):
        fidelity.frechet_distance(a[:1], b)


def test_ms_ssim_identical_vs_different() -> None:
    rng = np.random.default_rng(3)
    assert fidelity.ms_ssim_levels(32) == 3 and fidelity.ms_ssim_levels(256) == 5 and fidelity.ms_ssim_levels(16) == 2
    same = np.repeat(rng.uniform(-1, 1, size=(1, 1, 32, 32)).astype(np.float32), 10, axis=0)
    noise = rng.uniform(-1, 1, size=(10, 1, 32, 32)).astype(np.float32)
    assert fidelity.mean_pairwise_ms_ssim(same, pairs=20) == pytest.approx(1.0, abs=1e-4)
    assert fidelity.mean_pairwise_ms_ssim(noise, pairs=20) < 0.3


def test_dcr_share_copies_of_train_or_holdout() -> None:
    rng = np.random.default_rng(4)
    train = rng.uniform(-1, 1, size=(40, 1, 16, 16)).astype(np.float32)
    holdout = rng.uniform(-1, 1, size=(40, 1, 16, 16)).astype(np.float32)
    emb = make_embedding("pixels", 16)

    def share(samples: np.ndarray) -> float:
        return fidelity.dcr_share(
            fidelity.nearest_distances(emb, train, samples), fidelity.nearest_distances(emb, holdout, samples)
        )

    assert share(train[:20]) == 1.0
    assert share(holdout[:20]) == 0.0
    assert share(np.flip(train[:20], axis=3).copy()) == 1.0  # mirror images count as copies
    with pytest.raises(InvalidInput):
        fidelity.dcr_share(np.ones(3), np.ones(2))


def test_intensity_histogram_and_distance() -> None:
    a = np.full((4, 1, 8, 8), -0.5, dtype=np.float32)
    density, edges = fidelity.intensity_histogram(a, bins=4)
    assert edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert density.tolist() == [0.0, 2.0, 0.0, 0.0]
    assert fidelity.intensity_distance(a, a + 0.25) == pytest.approx(0.25)


def test_classifier_learns_a_visible_label() -> None:
    rng = np.random.default_rng(5)
    images = rng.normal(0, 0.2, size=(200, 1, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 2, size=200)
    images[labels == 1, :, 4:8, 4:8] += 0.8  # class 1 has a bright square
    images = np.clip(images, -1, 1)
    model = clf.train_classifier(images[:150], labels[:150], 2, steps=60, batch_size=32)
    probs, features = clf.predict(model, images[150:])
    scores = clf.score(probs, labels[150:])
    assert scores.accuracy > 0.9 and scores.auc > 0.95
    assert features.shape == (50, clf.FEATURE_DIM)
    untrained = clf.score(np.full((50, 2), 0.5), labels[150:])
    assert untrained.auc == 0.5


@pytest.mark.slow
def test_slice_classifier_finds_a_small_lesion_anywhere_in_a_shared_anatomy() -> None:
    """Slices: a faint 5-pixel blob at a random place in 32² slices that share their anatomy. Global max pooling
    finds it in 200 steps; the average pooling it replaced scored 0.47 and 0.55 on these two cohorts."""
    accuracies = []
    for seed in (6, 8):
        rng = np.random.default_rng(seed)
        anatomy = np.kron(rng.normal(0, 0.3, size=(8, 8)), np.ones((4, 4)))
        images = (anatomy + rng.normal(0, 0.1, size=(300, 1, 32, 32))).astype(np.float32)
        labels = rng.integers(0, 2, size=300)
        yy, xx = np.mgrid[:32, :32]
        for i in np.flatnonzero(labels):
            cy, cx = rng.integers(6, 26, size=2)
            images[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 2] += 0.8
        images = np.clip(images, -1, 1)
        model = clf.train_classifier(images[:240], labels[:240], 2, steps=200, batch_size=32)
        probs, _ = clf.predict(model, images[240:])
        accuracies.append(clf.score(probs, labels[240:]).accuracy)
    assert np.mean(accuracies) > 0.85, accuracies


@pytest.mark.slow
def test_volume_classifier_finds_a_small_lesion_anywhere_in_a_shared_anatomy() -> None:
    """Volumes: a small blob at a random place in 16³ heads that share their anatomy (the demo's situation)."""
    rng = np.random.default_rng(6)
    anatomy = np.repeat(np.repeat(np.repeat(rng.normal(0, 0.5, size=(4, 4, 4)), 4, 0), 4, 1), 4, 2)
    n = 240
    images = (anatomy + rng.normal(0, 0.1, size=(n, 1, 16, 16, 16))).astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    grid = np.stack(np.meshgrid(*(np.arange(16),) * 3, indexing="ij"))
    for i in np.flatnonzero(labels):
        centre = rng.integers(4, 12, size=3)
        images[i, 0][((grid - centre[:, None, None, None]) ** 2).sum(0) <= 2] += 1.0
    images = np.clip(images, -1, 1)
    model = clf.train_classifier(images[:180], labels[:180], 2, steps=120, batch_size=16)
    assert torch.allclose(model.voxel_mean, torch.from_numpy(images[:180]).mean(0, keepdim=True))
    probs, features = clf.predict(model, images[180:])
    scores = clf.score(probs, labels[180:])
    assert scores.accuracy > 0.85 and scores.auc > 0.9
    assert features.shape == (60, clf.FEATURE_DIM)
