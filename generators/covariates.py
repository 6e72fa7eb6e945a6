"""Conditioning on covariates (age, sex) besides the label: one condition id per sample, one embedding module.

A covariate model's denoiser keeps its network (diffusers ``UNet2DModel`` or MONAI ``DiffusionModelUNet``) and
swaps its class-embedding table for :class:`ConditionEmbedding`, which reads a *condition id* packing
``(label, sex, age)`` into one integer (:func:`encode`). Every code path that carried class ids (per-patient
gradients, classifier-free guidance, membership losses) therefore carries condition ids unchanged.

Each part has its own null value (label: the null class, sex: unknown, age: unknown); training drops each
part independently so that sampling can guide on any subset, and a request may leave a covariate open.
The embedding is the sum of a label row, a sex row and ``age_null + MLP(age features)`` for a known age (the
MLP's last layer starts at zero), so a model fresh from the public prior — which saw only null conditions —
samples what the prior samples for every age until DP training teaches it what age changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from generators.demographics import AGE_MAX, SEXES
from generators.errors import InvalidInput

SEX_NULL = len(SEXES)  # unknown or dropped
AGE_NULL = AGE_MAX + 1
AGE_FREQUENCIES = 8


def label_slots(n_classes: int) -> int:
    """Label values a condition id can carry: the labels and the null class."""
    return n_classes + 1


def encode(labels: torch.Tensor, sexes: torch.Tensor, ages: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Condition ids from label ids (``n_classes`` = null), sex ids (:data:`SEX_NULL` = null) and ages in years
    (:data:`AGE_NULL` = null); all integer tensors of one shape."""
    slots = label_slots(n_classes)
    return labels + slots * (sexes + (SEX_NULL + 1) * ages)


def null_condition(n_classes: int) -> int:
    """The condition id with every part null (what the public prior trains and guidance subtracts)."""
    return int(encode(torch.tensor(n_classes), torch.tensor(SEX_NULL), torch.tensor(AGE_NULL), n_classes))


def sex_id(value: str | None) -> int:
    return SEXES.index(value) if value in SEXES else SEX_NULL


def age_id(value: int | None) -> int:
    return AGE_NULL if value is None or value < 0 else min(int(value), AGE_MAX)


class ConditionEmbedding(nn.Module):
    """Condition id → embedding ``[..., dim]``: label row + sex row + age term (see the module docstring)."""

    frequencies: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.label = nn.Embedding(label_slots(n_classes), dim)
        self.sex = nn.Embedding(SEX_NULL + 1, dim)
        self.age_null = nn.Parameter(torch.zeros(dim))
        last = nn.Linear(dim, dim)
        self.age = nn.Sequential(nn.Linear(2 * AGE_FREQUENCIES, dim), nn.SiLU(), last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        frequencies = math.pi * 2.0 ** (torch.arange(AGE_FREQUENCIES, dtype=torch.float32) - 3)  # π/8 … 16π
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        slots = label_slots(self.n_classes)
        label = condition % slots
        rest = torch.div(condition, slots, rounding_mode="floor")
        sex = rest % (SEX_NULL + 1)
        age = torch.div(rest, SEX_NULL + 1, rounding_mode="floor")
        known = (age != AGE_NULL).unsqueeze(-1).to(self.age_null.dtype)
        phase = (age.clamp(max=AGE_MAX).to(self.age_null.dtype) / AGE_MAX).unsqueeze(-1) * self.frequencies
        age_term = self.age_null + known * self.age(torch.cat([phase.sin(), phase.cos()], dim=-1))
        return self.label(label) + self.sex(sex) + age_term

    def start_at_null(self) -> None:
        """Give every label and sex the null row (the prior trained only null conditions)."""
        with torch.no_grad():
            for table, null in ((self.label.weight, self.n_classes), (self.sex.weight, SEX_NULL)):
                table.copy_(table[null].expand_as(table))


def attach_condition_embedding(network: nn.Module, n_classes: int) -> nn.Module:
    """Replace ``network.class_embedding`` (an ``nn.Embedding`` in diffusers' and MONAI's UNets) by a
    :class:`ConditionEmbedding` of the same width; returns the network."""
    table = getattr(network, "class_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise InvalidInput("this network has no class-embedding table to condition on covariates")
    network.class_embedding = ConditionEmbedding(n_classes, table.embedding_dim)
    return network


def condition_ids(
    label_ids: Sequence[int], conditions: Sequence[Mapping[str, Any]] | None, n_classes: int
) -> torch.Tensor:
    """Condition ids of samples with these label ids and (optional) per-sample ``{"age", "sex"}`` values."""
    labels = torch.as_tensor(list(label_ids), dtype=torch.long)
    if conditions is None:
        conditions = [{}] * len(labels)
    sexes = torch.tensor([sex_id(c.get("sex")) for c in conditions], dtype=torch.long)
    ages = torch.tensor([age_id(c.get("age")) for c in conditions], dtype=torch.long)
    return encode(labels, sexes, ages, n_classes)
