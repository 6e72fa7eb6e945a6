"""Response schemas (OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FilterSummary(BaseModel):
    model_config = ConfigDict(extra="ignore")
    quantile: float
    embedding: str
    n_train: int
    n_holdout: int
    holdout_acceptance_rate: float
    canary_rejection_rate: float | None = None
    statement: str


class ModelCard(BaseModel):
    """A model's public card; nothing here is training data or a path."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {
                "id": "demo",
                "labels": {"healthy": 0, "lesion": 1},
                "image_size": 32,
                "dp": True,
                "private": True,
                "privacy_unit": "patient",
                "epsilon": 7.99,
                "delta": 1e-5,
                "accountant": "prv",
            }
        },
    )
    id: str
    labels: dict[str, int]
    image_size: int
    voxel_spacing_mm: list[float]
    dp: bool
    private: bool
    warning: str | None = None
    privacy_unit: str | None = None
    epsilon: float | None = Field(None, description="ε actually spent (patient-level)")
    delta: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    n_train_patients: int | None = None
    target_epsilon_met: bool | None = None
    statement: str | None = None
    memorization_filter: FilterSummary | None = None


class Health(BaseModel):
    status: str
    models: int | None = None


class CohortCreate(BaseModel):
    """A cohort request: how many samples of each label, from which model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"model": "demo", "counts": {"healthy": 10, "lesion": 10}, "seed": 0}},
    )
    model: str = Field(..., min_length=1, max_length=128)
    counts: dict[str, int] = Field(..., min_length=1, max_length=64, description="label → number of samples")
    seed: int = Field(0, ge=0, le=2**62)
    formats: list[str] = Field(default_factory=lambda: ["nifti"], max_length=3, description="nifti, png, npz")


class CohortStatus(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    model: str
    counts: dict[str, int]
    seed: int
    status: str = Field(..., description="queued, running, succeeded, failed or cancelled")
    progress: float
    generated: int
    rejected: int
    accepted: int
    error: str | None = None
    dataset_id: str | None = None
