"""Which parameters DP-SGD trains after the public prior (the rest stay frozen at the prior's values).

The DP noise added to the averaged gradient has norm ≈ σ·C·√d / B for ``d`` trained parameters, while each
patient's clipped contribution is at most ``C``: training fewer parameters raises the signal-to-noise ratio
of every step (DP-LDM, Lyu et al.). Frozen parameters need no per-patient gradient, so steps are cheaper too.
Presets train "all"; the subsets are compared in ``benchmarks/experiments/bench_utility.py`` (results: BENCHMARKS.md).

``lora`` keeps the body trainable through low-rank adapters (LoRA, Hu et al.; DP-LoRA) added by ``peft``:
each adapted layer's weight becomes ``W + B·A`` with ``A`` of rank ``r`` and ``B`` starting at zero, so DP
training starts exactly at the prior. When training ends the adapters are merged into the weights
(:func:`merged_weights`) and the released network has the plain architecture.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING

from generators.errors import InvalidInput

if TYPE_CHECKING:  # torch is needed only where a model is prepared: the set names stay light to import
    import torch

TRAINABLE_SETS = {
    "all": "every parameter (full fine-tuning)",
    "conditioning": "class and time embeddings, every block's time/class projection, attention and normalisation "
    "layers (DP-LDM style)",
    "embeddings": "class and time embeddings, every block's time/class projection and normalisation layers "
    "(feature-wise modulation only)",
    "lora": "low-rank adapters (LoRA, rank lora_rank) on every convolution, attention projection and time "
    "projection of the UNet's blocks, plus the label embeddings and normalisation layers; merged into the weights "
    "when training ends",
}
_PATTERNS = {
    "conditioning": r"^class_embedding\.|^time_embedding\.|\.time_emb_proj\.|\.attentions\.|norm",
    "embeddings": r"^class_embedding\.|^time_embedding\.|\.time_emb_proj\.|norm",
    "lora": r"\.lora_[AB]\.|^class_embedding\.|norm",
}
# the layers that get adapters: the blocks' convolutions, attention projections and time projections
# (not conv_in / conv_out, which map to and from one channel, nor the embeddings, which train in full)
_LORA_TARGETS = (
    r"^(down_blocks|mid_block|up_blocks)\..*\.(conv1|conv2|conv_shortcut|conv|to_q|to_k|to_v|to_out\.0|time_emb_proj)$"
)


def trainable_names(model: torch.nn.Module, which: str) -> list[str]:
    """Names of the parameters set ``which`` trains, in the model's order."""
    if which not in TRAINABLE_SETS:
        raise InvalidInput(f"unknown trainable set {which!r}; choose one of {sorted(TRAINABLE_SETS)}")
    names = [name for name, _ in model.named_parameters()]
    if which == "all":
        return names
    pattern = re.compile(_PATTERNS[which])
    return [name for name in names if pattern.search(name)]


def prepare_trainable(model: torch.nn.Module, which: str, lora_rank: int) -> dict[str, torch.nn.Parameter]:
    """Make ``model`` ready for DP training of set ``which``: add LoRA adapters when ``which == "lora"``
    (in place; ``B`` starts at zero, so the model's outputs are unchanged), then freeze everything outside the
    set. Returns the trainable parameters."""
    if which == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # imported here: only LoRA runs need peft

        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=_LORA_TARGETS)
        inject_adapter_in_model(config, model)
    return freeze_except(model, which)


def merged_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (a state dict of ``model``) with every LoRA adapter merged into its layer, keyed like the
    plain network; unchanged for a model without adapters."""
    if not any(".lora_" in key for key in weights):
        return weights
    import torch
    from peft.tuners.lora import LoraLayer

    adapted = copy.deepcopy(model)
    adapted.load_state_dict(weights)
    with torch.no_grad():
        for module in adapted.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if ".lora_" not in k}


def freeze_except(model: torch.nn.Module, which: str) -> dict[str, torch.nn.Parameter]:
    """Freeze every parameter outside set ``which`` (``requires_grad = False``); return the trainable ones."""
    keep = set(trainable_names(model, which))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return {name: p for name, p in model.named_parameters() if name in keep}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
