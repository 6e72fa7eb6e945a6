"""Which parameters DP-SGD trains after the public prior (the rest stay frozen at the prior's values).

The DP noise added to the averaged gradient has norm ≈ σ·C·√d / B for ``d`` trained parameters, while each
patient's clipped contribution is at most ``C``: training fewer parameters raises the signal-to-noise ratio
of every step (DP-LDM, Lyu et al.). Frozen parameters need no per-patient gradient, so steps are cheaper too.
Which set wins is measured in ``benchmarks/bench_utility.py``: on the demo cohort the subsets did *not* beat
full training (the frozen prior's body cannot draw lesions it never saw; BENCHMARKS.md), so presets keep "all".
"""

from __future__ import annotations

import re

import torch

from generators.errors import InvalidInput

TRAINABLE_SETS = {
    "all": "every parameter (full fine-tuning)",
    "conditioning": "class and time embeddings, every block's time/class projection, attention and normalisation "
    "layers (DP-LDM style)",
    "embeddings": "class and time embeddings, every block's time/class projection and normalisation layers "
    "(feature-wise modulation only)",
}
_PATTERNS = {
    "conditioning": r"^class_embedding\.|^time_embedding\.|\.time_emb_proj\.|\.attentions\.|norm",
    "embeddings": r"^class_embedding\.|^time_embedding\.|\.time_emb_proj\.|norm",
}


def trainable_names(model: torch.nn.Module, which: str) -> list[str]:
    """Names of the parameters set ``which`` trains, in the model's order."""
    if which not in TRAINABLE_SETS:
        raise InvalidInput(f"unknown trainable set {which!r}; choose one of {sorted(TRAINABLE_SETS)}")
    names = [name for name, _ in model.named_parameters()]
    if which == "all":
        return names
    pattern = re.compile(_PATTERNS[which])
    return [name for name in names if pattern.search(name)]


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
