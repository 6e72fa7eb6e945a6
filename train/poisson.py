"""Poisson sampling of training units (patients) on the run's device, split into passes.

The law is Opacus' ``UniformWithReplacementSampler`` (every unit joins a step independently with probability
``q``; the step count is fixed in advance) and the split is its ``BatchSplittingSampler``'s (``ceil(b / P)``
near-equal passes of at most ``P`` units; an empty batch is one empty pass, still a noised step). Drawn here
from a private generator on the device where the data lives, the mask, the indices and the passes never
visit the host: the one value read back per step is the batch's size, which decides how many passes run
(it stays in the process, like every other private draw).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class PoissonPasses:
    """``steps`` Poisson batches of ``units`` (a 1-D index tensor on ``generator``'s device), each as a list of
    passes of at most ``per_pass`` units (``None``: one pass per step)."""

    def __init__(
        self, units: torch.Tensor, sample_rate: float, generator: torch.Generator, steps: int, per_pass: int | None
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"the sampling rate must lie in (0, 1], got {sample_rate}")
        if per_pass is not None and per_pass < 1:
            raise ValueError(f"a pass needs room for at least one unit, got {per_pass}")
        self.units = units.to(generator.device)
        self.sample_rate, self.generator, self.steps, self.per_pass = sample_rate, generator, steps, per_pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for _ in range(self.steps):
            yield self.split(self.draw())

    def draw(self) -> torch.Tensor:
        """One Poisson batch: the units whose uniform draw falls under ``q`` (the same draw as Opacus')."""
        mask = torch.rand(len(self.units), generator=self.generator, device=self.generator.device) < self.sample_rate
        return self.units[mask]

    def split(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The batch as ``ceil(b / per_pass)`` near-equal passes in order (one empty pass for an empty batch)."""
        if self.per_pass is None or len(batch) == 0:
            return [batch]
        return list(torch.tensor_split(batch, math.ceil(len(batch) / self.per_pass)))
