"""Generator families by kind: adding one means writing its class and registering it here."""

from __future__ import annotations

from pathlib import Path

from generators.base import Generator
from generators.card import ModelCard, read_card
from generators.diffusion_2d import DiffusionModel
from generators.diffusion_3d import Diffusion3DModel
from generators.errors import InvalidInput

GENERATORS: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    """Register a generator class under its ``kind`` (usable as a class decorator)."""
    if cls.kind in GENERATORS and GENERATORS[cls.kind] is not cls:
        raise ValueError(f"generator kind {cls.kind!r} is already registered")
    GENERATORS[cls.kind] = cls
    return cls


register(DiffusionModel)
register(Diffusion3DModel)


def generator_class(card: ModelCard) -> type[Generator]:
    cls = GENERATORS.get(card.generator)
    if cls is None:
        raise InvalidInput(f"unknown generator kind {card.generator!r}; this synthcohort knows {sorted(GENERATORS)}")
    return cls


def load_generator(model_dir: str | Path, device: str = "auto") -> Generator:
    """The generator of the bundle at ``model_dir``, whichever family its card names."""
    return generator_class(read_card(model_dir)).load(model_dir, device=device)
