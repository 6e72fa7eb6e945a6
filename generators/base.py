"""The generator interface the rest of synthcohort speaks.

The pipeline, the filter, the audit, the writers, the CLI and the API use only :class:`Generator` (what it
generates and how to ask for it) and the :class:`~generators.card.ModelCard`. A generator family — the 2-D
diffusion model today, a 3-D one or a GAN later — is one class registered in :mod:`generators.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from generators.card import ModelCard
from generators.errors import InvalidInput

MAX_SAMPLES_PER_CALL = 100_000


@dataclass(frozen=True)
class Generated:
    """Samples from :meth:`Generator.generate`.

    Attributes:
        images: ``[N, C, H, W]`` (2-D) or ``[N, C, D, H, W]`` (3-D) float32 in [-1, 1] (CPU).
        labels: label name of each sample.
        seeds: the seed of each sample's initial noise; regenerating with it gives the same pixels.
        conditions: each sample's covariates (``{"age", "sex"}``) when the request gave them.
    """

    images: torch.Tensor
    labels: list[str]
    seeds: np.ndarray
    conditions: list[dict[str, Any]] | None = None


@runtime_checkable
class Generator(Protocol):
    """A trained, class-conditional generator of scans with its public card."""

    kind: ClassVar[str]  # the registry key written into the card's ``generator`` field
    card: ModelCard

    @property
    def label_ids(self) -> dict[str, int]: ...

    @property
    def spatial_dims(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Spatial shape of one sample: ``(H, W)`` or ``(D, H, W)``."""
        ...

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> Generator: ...

    def save(self, model_dir: str | Path, card: ModelCard | None = None) -> None:
        """Write the weights, then (last) the card."""
        ...

    def sampling_options(self, **requested: Any) -> dict[str, Any]:
        """The card's sampler defaults overridden by the non-``None`` ``requested`` options, validated."""
        ...

    def generate(
        self,
        *,
        labels: Mapping[str, int] | Sequence[str],
        seed: int,
        seeds: Sequence[int] | None = None,
        conditions: Sequence[Mapping[str, Any]] | None = None,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> Generated:
        """Sample ``i`` starts from noise seeded with ``seed + i`` (or ``seeds[i]``); deterministic per device.
        ``conditions[i]`` (``{"age": years, "sex": "F" | "M"}``) conditions sample ``i`` of a model whose card
        declares covariates; other models refuse them."""
        ...

    def membership_losses(
        self, images: np.ndarray, labels: np.ndarray, *, timesteps: Sequence[int], seed: int
    ) -> np.ndarray:
        """The training loss of each image at each fixed noise level, ``[len(timesteps), N]`` (white-box audit)."""
        ...


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def expand_labels(labels: Mapping[str, int] | Sequence[str], label_ids: Mapping[str, int]) -> list[str]:
    """Expand ``{"lesion": 3}`` or ``["lesion", ...]`` into one label per sample, checking names and counts."""
    if isinstance(labels, Mapping):
        names: list[str] = []
        for name, count in labels.items():
            if not isinstance(count, int | np.integer) or isinstance(count, bool) or count < 0:
                raise InvalidInput(f"count for label {name!r} must be a non-negative integer, got {count!r}")
            names.extend([str(name)] * int(count))
    else:
        names = [str(n) for n in labels]
    unknown = sorted({n for n in names if n not in label_ids})
    if unknown:
        raise InvalidInput(f"unknown label(s) {unknown}; valid labels are {sorted(label_ids)}")
    if not names:
        raise InvalidInput("nothing to generate: ask for at least one sample")
    if len(names) > MAX_SAMPLES_PER_CALL:
        raise InvalidInput(f"{len(names)} samples requested; at most {MAX_SAMPLES_PER_CALL} per call")
    return names


def preview_panel(image: np.ndarray) -> np.ndarray:
    """What a person looks at for one sample: a slice ``[H, W]`` as it is, a volume ``[D, H, W]`` as its three
    orthogonal mid-slices side by side (axial, coronal, sagittal; each in display orientation, superior up)."""
    if image.ndim not in (2, 3):
        raise InvalidInput(f"a sample is [H, W] or [D, H, W], got shape {image.shape}")
    if image.ndim == 2:
        return image
    d, h, w = image.shape
    axial = image[d // 2]
    coronal = image[::-1, h // 2, :]  # superior up, patient left→right
    sagittal = image[::-1, :, w // 2]  # superior up, anterior→posterior
    height = max(h, d)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 1)), constant_values=-1) for p in (axial, coronal, sagittal)]
    return np.concatenate(panels, axis=1)


def save_grid(images: torch.Tensor, path: Path, *, columns: int = 8, scale: int = 2) -> None:
    """Save ``[N, 1, H, W]`` images (or ``[N, 1, D, H, W]`` volumes, as :func:`preview_panel`) in [-1, 1] as one
    PNG grid (for looking at samples)."""
    from PIL import Image

    if images.dim() not in (4, 5):
        raise InvalidInput(f"a preview grid needs [N, 1, H, W] or [N, 1, D, H, W], got shape {tuple(images.shape)}")
    panels = [preview_panel(image[0]) for image in images.float().numpy()]
    if images.dim() == 5:
        columns = max(1, columns // 2)  # a volume's panel is three slices wide
    n, (h, w) = len(panels), panels[0].shape
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w), dtype=np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = ((np.clip(panel, -1, 1) + 1.0) * 127.5).round()
    Image.fromarray(grid).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)
