"""The 3-D class-conditional diffusion model (generator kind ``diffusion-3d``) on MONAI's ``DiffusionModelUNet``.

A sample is a volume ``[1, D, H, W]``: axial slices stacked inferior→superior, each in the 2-D display
convention (rows anterior→posterior, columns patient left→right; see :mod:`app.dataset_writer`).
Its part of a bundle (see :mod:`generators.layout` for the rest)::

    MODEL_DIR/unet3d_config.json      DiffusionModelUNet arguments (:class:`UNet3DSize` + class count)
    MODEL_DIR/unet3d.safetensors      weights
    MODEL_DIR/scheduler/              the training noise schedule (shared with the 2-D model)

Class ids ``0 .. n_classes-1`` are the labels and ``n_classes`` is the null class, as in 2-D.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors.torch import load_file, save_file

from generators.card import ModelCard, read_card
from generators.conditional_diffusion import ConditionalDiffusion
from generators.covariates import attach_condition_embedding
from generators.errors import InvalidInput
from generators.unet import UNet3DSize

CONFIG_FILE = "unet3d_config.json"
WEIGHTS_FILE = "unet3d.safetensors"


def build_unet_3d(*, n_classes: int, size: UNet3DSize) -> DiffusionModelUNet:
    """A fresh 3-D denoiser for ``[N, 1, D, H, W]`` volumes and ``n_classes`` labels (+1 null class)."""
    if len(size.channels) != len(size.attention_levels):
        raise InvalidInput("channels and attention_levels must have the same length")
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=size.channels,
        attention_levels=size.attention_levels,
        num_res_blocks=size.num_res_blocks,
        num_head_channels=size.num_head_channels,
        norm_num_groups=size.norm_num_groups,
        num_class_embeds=n_classes + 1,
    )


class Diffusion3DModel(ConditionalDiffusion):
    """Volumes ``[N, 1, D, H, W]`` (isotropic grid, ``D = H = W = image_size``)."""

    kind: ClassVar[str] = "diffusion-3d"
    dims: ClassVar[int] = 3

    def __init__(
        self,
        network: DiffusionModelUNet,
        size: UNet3DSize,
        scheduler_config: Mapping,
        card: ModelCard,
        device: str = "auto",
    ) -> None:
        super().__init__(network, scheduler_config, card, device)
        self.size = size

    def predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(len(x))
        return self.network(x, timesteps=t, class_labels=class_labels)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> Diffusion3DModel:
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        try:
            config = json.loads((model_dir / CONFIG_FILE).read_text())
            fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config["size"].items()}
            size = UNet3DSize(**fields)
            network = build_unet_3d(n_classes=int(config["n_classes"]), size=size)
            if card.covariates is not None:
                attach_condition_embedding(network, int(config["n_classes"]))
            network.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InvalidInput(f"model bundle {model_dir.name} is unreadable: {exc}") from None
        return cls(network, size, cls.load_scheduler_config(model_dir), card, device)

    def save_network(self, model_dir: Path) -> None:
        config = {"size": asdict(self.size), "n_classes": len(self.label_ids)}
        (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.network.state_dict().items()}
        save_file(state, str(model_dir / WEIGHTS_FILE))
