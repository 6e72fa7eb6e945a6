"""Generator families by kind: adding one means writing its class and registering it here.

Built-in kinds are imported on first use, so a 2-D process never pays for MONAI's import (≈ 2 s).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from generators.base import Generator
from generators.card import ModelCard, read_card
from generators.errors import InvalidInput

BUILT_IN = {
    "diffusion-2d": "generators.diffusion_2d:DiffusionModel",
    "diffusion-3d": "generators.diffusion_3d:Diffusion3DModel",
}
GENERATORS: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    """Register a generator class under its ``kind`` (usable as a class decorator)."""
    if cls.kind in GENERATORS and GENERATORS[cls.kind] is not cls:
        raise ValueError(f"generator kind {cls.kind!r} is already registered")
    GENERATORS[cls.kind] = cls
    return cls


def generator_class(kind: str) -> type[Generator]:
    if kind not in GENERATORS and kind in BUILT_IN:
        module, name = BUILT_IN[kind].split(":")
        register(getattr(importlib.import_module(module), name))
    if kind not in GENERATORS:
        known = sorted(set(GENERATORS) | set(BUILT_IN))
        raise InvalidInput(f"unknown generator kind {kind!r}; this synthcohort knows {known}")
    return GENERATORS[kind]


def load_generator(model_dir: str | Path, device: str = "auto") -> Generator:
    """The generator of the bundle at ``model_dir``, whichever family its card names."""
    card: ModelCard = read_card(model_dir)
    return generator_class(card.generator).load(model_dir, device=device)
