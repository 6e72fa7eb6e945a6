"""The class-conditional 2-D denoiser (a ``diffusers.UNet2DModel`` with a class embedding) and the size records
of the 2-D and 3-D denoisers (the 3-D network itself is built in :mod:`generators.diffusion_3d`).

Class ids ``0 .. n_classes-1`` are the cohort's labels (sorted names); id ``n_classes`` is the *null*
class used for classifier-free guidance (trained by label dropout). No training code lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported where a network is built: the size records stay light to import
    from diffusers import UNet2DModel


@dataclass(frozen=True)
class UNetSize:
    """Width and depth of the denoiser (one entry per resolution level)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 8
    # ADM's adaptive group norm (Dhariwal & Nichol 2021): the time + class embedding scales and shifts each
    # ResNet block's normalised features instead of being added to them
    scale_shift: bool = False


@dataclass(frozen=True)
class UNet3DSize:
    """Width and depth of the 3-D denoiser (one entry per resolution level)."""

    channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 16
    norm_num_groups: int = 8


def build_unet(*, image_size: int, n_classes: int, size: UNetSize) -> UNet2DModel:
    """A fresh UNet for ``[N, 1, image_size, image_size]`` images and ``n_classes`` labels (+1 null class)."""
    from diffusers import UNet2DModel

    if len(size.block_out_channels) != len(size.attention_levels):
        raise ValueError("block_out_channels and attention_levels must have the same length")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in size.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(size.attention_levels))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=size.block_out_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=size.norm_num_groups,
        attention_head_dim=None if not any(size.attention_levels) else size.block_out_channels[-1] // 2,
        num_class_embeds=n_classes + 1,
        resnet_time_scale_shift="scale_shift" if size.scale_shift else "default",
        dropout=0.0,
    )


def null_class(n_classes: int) -> int:
    """The class id that means "no label" (classifier-free guidance)."""
    return n_classes


def use_plain_attention(model: UNet2DModel) -> None:
    """Switch attention to diffusers' classic processor (bmm + softmax).

    ``torch.func.vmap`` (used for exact per-patient gradients) has no batching rule for PyTorch's fused CPU
    attention kernel and falls back to a slow loop; the classic processor computes the same function with
    ops that vmap batches natively.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())


def use_plain_upsampling(model: UNet2DModel) -> None:
    """Upsample by repeating each pixel twice along both axes instead of ``F.interpolate(mode="nearest")``.

    The values are identical. ``torch.compile`` cannot trace interpolate's kernel inside ``torch.func.vmap`` (it
    clones with a memory format vmap does not support), so the compiled per-patient gradients need this form.
    """
    from diffusers.models.upsampling import Upsample2D

    for module in model.modules():
        if isinstance(module, Upsample2D) and module.interpolate and not module.use_conv_transpose:
            module.forward = _repeat_upsample.__get__(module)


def _repeat_upsample(self, hidden_states, output_size=None, *args, **kwargs):  # Upsample2D.forward's signature
    if output_size is not None:  # an odd size (never at the presets' sizes): diffusers' own path
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    hidden_states = hidden_states.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    if self.use_conv:
        hidden_states = self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
    return hidden_states
