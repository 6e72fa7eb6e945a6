"""The 2-D class-conditional diffusion model (generator kind ``diffusion-2d``) on a ``diffusers.UNet2DModel``.

Its part of a bundle (see :mod:`generators.layout` for the rest)::

    MODEL_DIR/config.json                          UNet2DModel arguments (diffusers ``save_pretrained``)
    MODEL_DIR/diffusion_pytorch_model.safetensors  weights (the EMA of the DP iterates)
    MODEL_DIR/scheduler/scheduler_config.json      the training noise schedule
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from generators.card import ModelCard, read_card
from generators.conditional_diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS, SOLVERS, ConditionalDiffusion
from generators.covariates import attach_condition_embedding
from generators.errors import InvalidInput

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS", "SOLVERS", "DiffusionModel"]

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class DiffusionModel(ConditionalDiffusion):
    """Axial slices ``[N, 1, H, W]``."""

    kind: ClassVar[str] = "diffusion-2d"
    dims: ClassVar[int] = 2

    def __init__(self, unet: UNet2DModel, scheduler_config: Mapping, card: ModelCard, device: str = "auto") -> None:
        super().__init__(unet, scheduler_config, card, device)

    @property
    def unet(self) -> UNet2DModel:
        return self.network

    def predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, class_labels=class_labels).sample

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> DiffusionModel:
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        try:
            if card.covariates is None:
                unet = UNet2DModel.from_pretrained(str(model_dir), low_cpu_mem_usage=False)
            else:  # the class table was swapped for a condition embedding: build, swap, then load the weights
                unet = UNet2DModel.from_config(UNet2DModel.load_config(str(model_dir)))
                attach_condition_embedding(unet, len(card.labels))
                unet.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise InvalidInput(f"model bundle {model_dir.name} is unreadable: {exc}") from None
        return cls(unet, cls.load_scheduler_config(model_dir), card, device)

    def save_network(self, model_dir: Path) -> None:
        self.unet.save_pretrained(str(model_dir), safe_serialization=True)
