"""Response schemas (OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.cohort_spec import CovariateTargets


class FilterSummary(BaseModel):
    """The memorization filter's public summary: its rule and coarse rates, no counts, no threshold."""

    model_config = ConfigDict(extra="ignore")
    quantile: float
    embedding: str
    holdout_acceptance_rate: float | None = Field(None, description="share of held-out patients accepted (2 d.p.)")
    canary_rejection_rate: float | None = Field(None, description="share of planted near-copies rejected (2 d.p.)")
    covered_by_epsilon: bool = False
    statement: str


class PatientsEstimate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    value: int = Field(..., description="differentially private count of training units (included in ε)")
    noise_std: float
    mechanism: str


class ServedModelCard(BaseModel):
    """A served model's public card as the API returns it (a view of ``generators.card.ModelCard``); nothing here
    is training data or a path."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {
                "id": "demo",
                "generator": "diffusion-2d",
                "spatial_dims": 2,
                "labels": {"healthy": 0, "lesion": 1},
                "image_size": 32,
                "image_shape": [32, 32],
                "dp": True,
                "private": True,
                "privacy_unit": "patient",
                "epsilon": 7.99,
                "delta": 1e-6,
                "accountant": "prv",
                "neighbouring_relation": "add/remove one patient",
            }
        },
    )
    id: str
    generator: str = Field(description="generator family, e.g. diffusion-2d")
    spatial_dims: int = Field(description="2: slices, 3: volumes")
    labels: dict[str, int]
    covariates: dict | None = Field(
        None, description="covariates the model was trained on, with the DECLARED age range a request may use"
    )
    image_size: int
    image_shape: list[int] = Field(description="spatial shape of one sample: [H, W] or [D, H, W]")
    voxel_spacing_mm: list[float]
    dp: bool
    private: bool
    warning: str | None = None
    privacy_unit: str | None = None
    neighbouring_relation: str | None = None
    epsilon: float | None = Field(None, description="ε actually spent (per privacy unit), count release included")
    delta: float | None = None
    accountant: str | None = None
    privacy_history: list[list[float]] | None = Field(
        None, description="(noise multiplier, sample rate, steps) of every mechanism composed into ε"
    )
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    patients_estimate: PatientsEstimate | None = None
    target_epsilon_met: bool | None = None
    statement: str | None = None
    memorization_filter: FilterSummary | None = None


class Health(BaseModel):
    status: str
    models: int | None = None


class CohortStatus(BaseModel):
    """A job's status. ``generated`` and ``rejected`` (the memorization filter's totals) are shown to admins
    only: they are computed from the training data."""

    id: str
    model: str
    counts: dict[str, int]
    seed: int
    covariates: dict[str, CovariateTargets] | None = None
    status: str = Field(..., description="queued, running, succeeded, failed, cancelled or expired (dataset deleted)")
    progress: float
    done: int = Field(..., description="samples finished so far")
    total: int = Field(..., description="samples requested")
    error: str | None = None
    dataset_id: str | None = None
    generated: int | None = Field(None, description="admins only")
    rejected: int | None = Field(None, description="admins only")
