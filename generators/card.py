"""The public model card: one typed record, written and read only here, validated on load.

The card is everything about a model that may leave the server: labels, geometry, the privacy guarantee and
public training choices. It never holds an exact private count, a path or a per-sample number.

Formats: 3 names the generator kind and its spatial dimensions; 2 (the first format without exact private
counts) is read as a 2-D diffusion card. Older formats are refused: they published exact counts and seeded
their DP noise from a public seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from generators.atomic import write_json_atomic
from generators.demographics import validate_declared
from generators.errors import InvalidInput, NotFound
from generators.layout import BundleLayout

CARD_FORMAT = 3
READABLE_FORMATS = (2, 3)


class ModelCard(BaseModel):
    """What a bundle's ``model_card.json`` holds (unknown fields are refused: a newer writer, or tampering)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = CARD_FORMAT
    created: str
    generator: str = Field(description="registered generator kind that loads this bundle")
    spatial_dims: int = Field(ge=2, le=3)
    labels: dict[str, int]
    null_class: int | None = None
    covariates: dict[str, Any] | None = None  # declared (not measured) ranges, see generators.demographics
    image_size: int = Field(ge=4, le=1024)
    voxel_spacing_mm: list[float] = Field(min_length=3, max_length=3)
    voxel_spacing_source: str = ""
    orientation: str = ""
    # privacy
    dp: bool
    privacy_unit: str = "patient"
    neighbouring_relation: str = ""
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    target_epsilon_met: bool = False
    accountant: str | None = None
    privacy_history: list[tuple[float, float, int]] = Field(default_factory=list)  # (σ, q, steps) per mechanism
    patients_estimate: dict[str, Any] | None = None
    noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    sampling: str = ""
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    statement: str = ""
    randomness: dict[str, Any] = Field(default_factory=dict)
    warning: str | None = None
    # training
    steps: int = 0
    planned_steps: int = 0
    stopped_early: bool = False
    epochs: float | None = None
    noise_multiplicity: int = 1
    slices_per_patient: int = 1
    trainable_parameters: dict[str, Any] = Field(default_factory=dict)
    preset: dict[str, Any] = Field(default_factory=dict)
    public_pretraining: dict[str, Any] | None = None
    prediction_type: str | None = None
    # the recipe choices that shape utility, in words: network family and norm, prediction target, loss weighting
    denoiser: dict[str, Any] = Field(default_factory=dict)
    ema_decay: float | None = None  # the preset's; the warm-up keeps short runs below it:
    ema_decay_last_step: float | None = None  # the decay actually applied at the last step
    sampler: dict[str, Any] = Field(default_factory=dict)
    # provenance
    store_id: str | None = None
    training_inputs_digest: str = ""
    library_versions: dict[str, str] = Field(default_factory=dict)
    device: str = "cpu"
    world_size: int = Field(1, ge=1, description="training processes (ranks) of the run that finished the model")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Read format 2 (2-D diffusion, before generators were a family) as format 3."""
        if isinstance(data, dict) and data.get("format") == 2:
            data = {**data, "format": 3, "generator": "diffusion-2d", "spatial_dims": 2}
        return data

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value not in READABLE_FORMATS:
            raise ValueError(
                f"card format {value} is not readable: formats before 2 published exact private counts and seeded "
                f"their DP noise (retrain the model); formats after {CARD_FORMAT} need a newer synthcohort"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _label_ids(cls, value: dict[str, int]) -> dict[str, int]:
        if not value or sorted(value.values()) != list(range(len(value))):
            raise ValueError("labels must map each name to a distinct id 0..n-1")
        return value

    @field_validator("covariates")
    @classmethod
    def _declared_covariates(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            return validate_declared(value)
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"covariates: {exc}") from None

    @model_validator(mode="after")
    def _privacy_complete(self) -> ModelCard:
        if self.dp and (self.epsilon is None or self.delta is None or self.accountant is None):
            raise ValueError("a DP card must state epsilon, delta and its accountant")
        return self

    # --------------------------------------------------------------------------------- derived
    @property
    def image_shape(self) -> tuple[int, ...]:
        """Spatial shape of one sample: ``(H, W)`` or ``(D, H, W)``."""
        return (self.image_size,) * self.spatial_dims

    def to_json(self) -> dict:
        """Exactly what ``model_card.json`` holds."""
        return json.loads(self.model_dump_json())

    def public(self, fields: tuple[str, ...]) -> dict:
        return {name: value for name, value in self.to_json().items() if name in fields}

    @classmethod
    def parse(cls, data: Any, *, source: str = "model card") -> ModelCard:
        """Validate a card's JSON; a clear :class:`InvalidInput` names what is wrong."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"{source} is not a valid synthcohort model card: {problems}") from None


def card_exists(model_dir: str | Path) -> bool:
    return BundleLayout(model_dir).card.is_file()


def read_card(model_dir: str | Path) -> ModelCard:
    """The validated card of the bundle at ``model_dir``."""
    path = BundleLayout(model_dir).card
    if not path.is_file():
        raise NotFound(f"no model bundle at {Path(model_dir).name} (no model card; was training completed?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"the model card of {Path(model_dir).name} is unreadable: {exc}") from None
    return ModelCard.parse(data, source=f"the model card of {Path(model_dir).name}")


def write_card(model_dir: str | Path, card: ModelCard) -> None:
    """Write the card atomically; it is written last, so a directory without it is not a bundle."""
    write_json_atomic(BundleLayout(model_dir).card, card.to_json())
