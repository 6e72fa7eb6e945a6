"""``/v1/models``: public model cards (labels, image size, ε, δ, privacy unit, filter summary)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentKey, RegistryDep
from app.api.schemas import ServedModelCard

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ServedModelCard], summary="List the served models")
def list_models(registry: RegistryDep, _key: CurrentKey) -> list[dict]:
    return [model.public() for model in registry.models.values()]


@router.get("/{model_id}", response_model=ServedModelCard, summary="One model's public card")
def get_model(model_id: str, registry: RegistryDep, _key: CurrentKey) -> dict:
    return registry.get(model_id).public()  # NotFound → 404 (app.errors)
