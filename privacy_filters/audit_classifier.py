"""A small CNN label classifier for utility audits (train on synthetic / test on real, TSTR, vs TRTR), for slices
or (3-D convolutions) volumes.

Global max pooling, not average pooling, ends the convolutions: a lesion anywhere in the image is evidence, however
small a share of it. With average pooling the slice classifier was under-trained at its fixed budget: on a
validation split of the demo's *training* patients it scored 0.76–0.85 over six seeds (the held-out patients'
TRTR 0.69–0.92 over eight), with max pooling 0.97–0.99 in the same 600 steps (BENCHMARKS.md). Volumes also
standardise every voxel by the mean and spread of the classifier's OWN training set at that voxel (so an unusual
region stands out from the anatomy every head shares); on the demo volumes at 32³ that took the classifier from
chance, 0.50, to 0.95.

Its 64-d penultimate layer is also the feature space of the audit's Fréchet distance: features that were
learned to tell the labels apart, need no download, and fit the image size of the model under audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from generators.errors import InvalidInput

FEATURE_DIM = 64


class SmallCNN(nn.Module):
    """Three conv blocks (16-32-64 channels, GroupNorm, SiLU), global max pool, 64-d features, logits.

    Slices: 2-D convolutions. Volumes (``spatial_dims=3``): per-voxel standardisation (fitted by
    :meth:`fit_standardisation`), 3-D convolutions.
    """

    voxel_mean: torch.Tensor  # buffers (registered in __init__)
    voxel_scale: torch.Tensor

    def __init__(self, n_classes: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv, pool, gap = (
            (nn.Conv3d, nn.MaxPool3d, nn.AdaptiveMaxPool3d)
            if spatial_dims == 3
            else (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
        )

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(conv(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(), pool(2))

        self.spatial_dims = spatial_dims
        self.register_buffer("voxel_mean", torch.zeros(()))
        self.register_buffer("voxel_scale", torch.ones(()))
        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), gap(1), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(64, FEATURE_DIM), nn.SiLU())
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def fit_standardisation(self, images: torch.Tensor) -> None:
        """Volumes only: per-voxel mean and spread (+ 0.1, so empty background is not amplified) of ``images``,
        the classifier's own training set. Slices keep the identity."""
        if self.spatial_dims == 3:
            self.voxel_mean = images.mean(0, keepdim=True).to(self.voxel_mean.device)
            self.voxel_scale = (images.std(0, keepdim=True) + 0.1).to(self.voxel_scale.device)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.voxel_mean) / self.voxel_scale

    def embed_standardised(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, [D,] H, W) -> (B, 64)
        return self.features(self.body(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, [D,] H, W) -> (B, 64)
        return self.embed_standardised(self.standardise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, [D,] H, W) -> (B, n_classes)
        return self.head(self.embed(x))


@dataclass(frozen=True)
class ClassifierScores:
    accuracy: float
    auc: float  # one-vs-rest macro AUC for more than two labels


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    steps: int = 600,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SmallCNN:
    """Train :class:`SmallCNN` for a fixed number of steps (same budget whatever the training set size) on slices
    ``[N, 1, H, W]`` or volumes ``[N, 1, D, H, W]`` (3-D convolutions).

    Augmentation: random left-right flips and ±2-pixel shifts (of the standardised images), so the classifier
    learns the label, not the pose.
    """
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return _train(
        images, targets, n_classes, nn.functional.cross_entropy, steps, batch_size, learning_rate, seed, device
    )


def train_regressor(
    images: np.ndarray,
    values: np.ndarray,
    *,
    steps: int = 600,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SmallCNN:
    """:class:`SmallCNN` with one output trained by mean squared error to predict ``values`` (e.g. age / 90);
    same augmentation and budget as :func:`train_classifier`. Predict with ``model(x)[:, 0]``."""
    targets = torch.from_numpy(np.asarray(values, dtype=np.float32)).view(-1, 1)
    return _train(images, targets, 1, nn.functional.mse_loss, steps, batch_size, learning_rate, seed, device)


def _train(images, targets, outputs, loss_fn, steps, batch_size, learning_rate, seed, device) -> SmallCNN:
    if len(images) != len(targets) or len(images) == 0:
        raise InvalidInput("classifier training needs one target per image and at least one image")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(outputs, spatial_dims=np.ndim(images) - 2).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps)
    x_all = torch.from_numpy(np.array(images, dtype=np.float32))
    model.fit_standardisation(x_all)
    x_all = model.standardise(x_all.to(model.voxel_mean.device)).cpu()
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=generator)
        x = _augment(x_all[pick], generator).to(device)
        loss = loss_fn(model.head(model.embed_standardised(x)), targets[pick].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # (B, 1, [D,] H, W)
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, *(1,) * (x.dim() - 1)), x.flip(-1), x)
    axes = tuple(range(2, x.dim()))
    shifts = tuple(int(v) for v in torch.randint(-2, 3, (len(axes),), generator=generator))
    return torch.roll(x, shifts=shifts, dims=axes)


@torch.no_grad()
def predict_values(model: SmallCNN, images: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """A :func:`train_regressor` model's predictions ``[N]``."""
    device = next(model.parameters()).device
    if np.ndim(images) == 5:
        batch_size = max(1, batch_size // 16)
    out = [
        model(torch.from_numpy(np.asarray(images[i : i + batch_size], dtype=np.float32)).to(device))[:, 0].cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


@torch.no_grad()
def predict(model: SmallCNN, images: np.ndarray, *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(class probabilities [N, C], 64-d features [N, 64])``."""
    device = next(model.parameters()).device
    if np.ndim(images) == 5:
        batch_size = max(1, batch_size // 16)  # volumes: about the memory of a batch of slices
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32)).to(device)
        f = model.embed(x)
        probs.append(torch.softmax(model.head(f), 1).cpu().numpy())
        feats.append(f.cpu().numpy())
    return np.concatenate(probs), np.concatenate(feats)


def score(probs: np.ndarray, labels: np.ndarray) -> ClassifierScores:
    """Accuracy and ROC AUC of predicted probabilities against true labels."""
    accuracy = float((probs.argmax(1) == labels).mean())
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")
    elif probs.shape[1] == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))
    return ClassifierScores(accuracy=accuracy, auc=auc)
