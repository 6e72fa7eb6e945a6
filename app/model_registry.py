"""The served models: one bundle per subdirectory of ``--models``; the directory name is the model id.

Only public fields leave this module: no paths, nothing from ``private/``. The registry needs only a bundle's
public parts (card and filter summary), so an API-only process can serve from a public copy of the bundles
(``synthcohort public-copy``) while workers hold the whole bundles.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from generators.card import ModelCard, card_exists, read_card
from generators.errors import InvalidInput, NotFound
from generators.layout import BundleLayout
from privacy_filters import public_summary

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
PUBLIC_CARD_FIELDS = (
    "generator",
    "spatial_dims",
    "labels",
    "covariates",
    "image_size",
    "voxel_spacing_mm",
    "dp",
    "privacy_unit",
    "neighbouring_relation",
    "epsilon",
    "delta",
    "accountant",
    "privacy_history",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "epochs",
    "noise_multiplicity",
    "patients_estimate",
    "target_epsilon",
    "target_epsilon_met",
    "statement",
    "public_pretraining",
    "sampler",
    "created",
)


def read_filter_summary(model_dir: Path) -> dict | None:
    """The filter's public summary (``filter_summary.json``, written by calibrate); ``None``: not calibrated.
    A bundle calibrated before that file existed has its summary computed from its private calibration record."""
    layout = BundleLayout(model_dir)
    if layout.filter_summary.is_file():
        return json.loads(layout.filter_summary.read_text())
    if layout.calibration.is_file():
        return public_summary(json.loads(layout.calibration.read_text()))
    return None


@dataclass(frozen=True)
class ServedModel:
    id: str
    path: Path
    card: ModelCard
    filter_summary: dict | None

    def public(self) -> dict:
        info = {"id": self.id, **self.card.public(PUBLIC_CARD_FIELDS)}
        info["image_shape"] = list(self.card.image_shape)
        info["private"] = self.card.dp
        if not info["private"]:
            info["warning"] = "NOT PRIVATE: trained without differential privacy"
        info["memorization_filter"] = self.filter_summary
        return info


class ModelRegistry:
    """Scans the models directory once; models without a DP guarantee are hidden unless allowed."""

    def __init__(self, root: Path, *, allow_not_private: bool = False) -> None:
        self.root = Path(root)
        self.allow_not_private = allow_not_private
        self.models: dict[str, ServedModel] = {}
        if not self.root.is_dir():
            raise NotFound(f"models directory {self.root} does not exist")
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and MODEL_ID.fullmatch(p.name)):
            if not card_exists(path):
                continue
            try:
                card = read_card(path)
            except InvalidInput as error:  # one bad bundle must not take the others down
                log.warning("not serving model %s: %s", path.name, error)
                continue
            if not card.dp and not allow_not_private:
                continue
            self.models[path.name] = ServedModel(path.name, path, card, read_filter_summary(path))

    def get(self, model_id: str) -> ServedModel:
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(f"unknown model {model_id!r}; available: {sorted(self.models)}")
        return model
