"""The covariates a model may declare and their value sets, torch-free: a card is read and a request checked
against them before any model is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from generators.errors import InvalidInput

COVARIATES = ("age", "sex")
SEXES = ("F", "M")  # the sexes a model conditions on; any other value counts as unknown
AGE_MAX = 90  # ages in years are capped here (HIPAA Safe Harbor: over 89 is reported as one "90 or older" bucket)


def validate_declared(covariates: Mapping[str, Any]) -> dict[str, Any]:
    """The declared covariates a model is trained on: ``{"age": {"min": a, "max": b}, "sex": ["F", "M"]}``."""
    unknown = sorted(set(covariates) - set(COVARIATES))
    if unknown:
        raise InvalidInput(f"unknown covariate(s) {unknown}; supported: {list(COVARIATES)}")
    out: dict[str, Any] = {}
    if "age" in covariates:
        age = covariates["age"]
        low, high = int(age["min"]), int(age["max"])
        if not 0 <= low < high <= AGE_MAX:
            raise InvalidInput(f"declared age range must satisfy 0 <= min < max <= {AGE_MAX}, got {low}-{high}")
        out["age"] = {"min": low, "max": high, "unit": "years"}
    if "sex" in covariates:
        out["sex"] = list(SEXES)
    return out


def declare(names: str, age_range: str = "18-90") -> dict[str, Any]:
    """Declared covariates from the CLI's ``age,sex`` and ``MIN-MAX``."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    low, _, high = age_range.partition("-")
    try:
        age = {"min": int(low), "max": int(high)}
    except ValueError:
        raise InvalidInput(f"age range must be MIN-MAX in years, e.g. 18-90; got {age_range!r}") from None
    return validate_declared({name: age if name == "age" else SEXES for name in chosen})
