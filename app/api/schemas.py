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
