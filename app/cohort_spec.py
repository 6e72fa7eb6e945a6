"""What a researcher asks for besides counts: covariate targets per label, in one schema for the CLI's
``--spec`` file, the REST body and Python.

Per label, ``age`` is one age for every sample (``65``), a range drawn uniformly (``{"min": 60, "max": 80}``),
a histogram of shares per age bin (``{"histogram": {"60-69": 0.5, "70-79": 0.5}}``) or one age per sample (a
list as long as the count); ``sex`` is one value (``"F"``), proportions (``{"F": 0.5, "M": 0.5}``, met exactly
up to rounding) or one value per sample. A covariate left out is left
open (the model samples it). Expansion into per-sample values is deterministic in (request seed, label,
count) and touches no private data, so it may use the public seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from generators.demographics import AGE_MAX
from generators.errors import InvalidInput

Sex = Literal["F", "M"]
MAX_LIST = 1_000_000
MAX_SAMPLES = 1_000_000  # samples in one cohort


class AgeRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: StrictInt = Field(ge=0, le=AGE_MAX)
    max: StrictInt = Field(ge=0, le=AGE_MAX)

    @model_validator(mode="after")
    def _ordered(self) -> AgeRange:
        if self.min > self.max:
            raise ValueError(f"age range min {self.min} is above max {self.max}")
        return self


class AgeHistogram(BaseModel):
    """Shares of the samples per age bin, e.g. ``{"histogram": {"60-69": 0.5, "70-79": 0.5}}``; met exactly up
    to rounding, ages uniform within a bin."""

    model_config = ConfigDict(extra="forbid")
    histogram: dict[str, float] = Field(min_length=1, max_length=AGE_MAX + 1)

    @model_validator(mode="after")
    def _bins(self) -> AgeHistogram:
        for name, share in self.histogram.items():
            low, high = _bin(name)
            if not 0 <= low <= high <= AGE_MAX or share < 0:
                raise ValueError(f"age bin {name!r} must be MIN-MAX within 0-{AGE_MAX} with a share >= 0")
        if abs(sum(self.histogram.values()) - 1.0) > 1e-6:
            raise ValueError("age histogram shares must sum to 1")
        return self

    def bounds(self) -> tuple[int, int]:
        edges = [_bin(name) for name in self.histogram]
        return min(low for low, _ in edges), max(high for _, high in edges)


def _bin(name: str) -> tuple[int, int]:
    low, _, high = name.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"age bin {name!r} must be written MIN-MAX, e.g. 60-69") from None


class CovariateTargets(BaseModel):
    """Covariate targets of one label's samples."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"age": {"min": 60, "max": 80}, "sex": {"F": 0.5, "M": 0.5}}}
    )
    age: StrictInt | AgeRange | AgeHistogram | list[StrictInt] | None = Field(
        None, description="years: one value, {min, max}, {histogram: {MIN-MAX: share}}, or one per sample"
    )
    sex: Sex | dict[Sex, float] | list[Sex] | None = Field(
        None, description="F or M, {F: p, M: 1-p}, or one per sample"
    )

    @model_validator(mode="after")
    def _values(self) -> CovariateTargets:
        ages = [self.age] if isinstance(self.age, int) else self.age if isinstance(self.age, list) else []
        if any(not 0 <= a <= AGE_MAX for a in ages):
            raise ValueError(f"ages must be whole years in 0-{AGE_MAX}")
        if isinstance(self.sex, dict):
            shares = list(self.sex.values())
            if any(p < 0 for p in shares) or abs(sum(shares) - 1.0) > 1e-6:
                raise ValueError("sex proportions must be non-negative and sum to 1")
        for values in (self.age, self.sex):
            if isinstance(values, list) and not 1 <= len(values) <= MAX_LIST:
                raise ValueError(f"a per-sample list must have 1 to {MAX_LIST} entries")
        return self

    def check(self, label: str, count: int, declared: dict[str, Any] | None) -> None:
        """Within what the model was trained on, and lists as long as the count."""
        for name in ("age", "sex"):
            value = getattr(self, name)
            if value is None:
                continue
            if declared is None:
                raise InvalidInput("this model was not trained on covariates (age, sex); ask by label only")
            if name not in declared:
                raise InvalidInput(f"this model was not trained on {name}; leave it out of the request")
            if isinstance(value, list) and len(value) != count:
                raise InvalidInput(f"{label}: {name} lists {len(value)} values for {count} samples")
        if self.age is not None and declared is not None and "age" in declared:
            low, high = declared["age"]["min"], declared["age"]["max"]
            if isinstance(self.age, AgeRange):
                ages = [self.age.min, self.age.max]
            elif isinstance(self.age, AgeHistogram):
                ages = list(self.age.bounds())
            else:
                ages = self.age if isinstance(self.age, list) else [self.age]
            if min(ages) < low or max(ages) > high:
                raise InvalidInput(f"{label}: ages must lie in {low}-{high}, the range the model declares")

    def draw(self, label: str, count: int, seed: int) -> dict[str, np.ndarray]:
        """Per-sample values as arrays (``age``: int64 years, ``sex``: ``F``/``M``), only for the covariates asked
        for; computed once per label (a million samples take a few MB, not a million dicts)."""
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        drawn: dict[str, np.ndarray] = {}
        if isinstance(self.age, AgeRange):
            drawn["age"] = rng.integers(self.age.min, self.age.max + 1, size=count)
        elif isinstance(self.age, AgeHistogram):
            names, counts = _apportion(self.age.histogram, count)
            edges = np.array([_bin(name) for name in names])[rng.permutation(np.repeat(np.arange(len(names)), counts))]
            drawn["age"] = rng.integers(edges[:, 0], edges[:, 1] + 1)
        elif self.age is not None:
            drawn["age"] = np.asarray(self.age if isinstance(self.age, list) else [self.age] * count)
        if isinstance(self.sex, dict):
            names, counts = _apportion(self.sex, count)
            drawn["sex"] = rng.permutation(np.repeat(np.array(names), counts))
        elif self.sex is not None:
            drawn["sex"] = np.asarray(self.sex if isinstance(self.sex, list) else [self.sex] * count)
        return drawn

    def expand(self, label: str, count: int, seed: int) -> list[dict[str, Any]]:
        """One ``{"age": ..., "sex": ...}`` per sample (keys only for the covariates asked for)."""
        return rows_of(self.draw(label, count, seed), range(count))


def rows_of(drawn: dict[str, np.ndarray], indices) -> list[dict[str, Any]]:
    """The per-sample dicts of the samples at ``indices`` (from :meth:`CovariateTargets.draw`)."""
    cast = {"age": int, "sex": str}
    return [{name: cast[name](values[i]) for name, values in drawn.items()} for i in indices]


def _apportion(shares: dict[str, float], count: int) -> tuple[list[str], np.ndarray]:
    """How many of ``count`` samples each name gets, in the given proportions, by largest remainder (exact up to
    one sample); names sorted."""
    names = sorted(shares)
    exact = np.array([shares[n] * count for n in names])
    whole = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - whole), kind="stable")[: count - whole.sum()]:
        whole[i] += 1
    return names, whole


def parse_covariates(data: Any) -> dict[str, CovariateTargets]:
    """``{label: targets}`` from JSON-like data; a clear :class:`InvalidInput` for a bad spec."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("covariates must map each label to its targets, e.g. {lesion: {age: {min: 60, max: 80}}}")
    out = {}
    for label, targets in data.items():
        try:
            out[str(label)] = (
                targets if isinstance(targets, CovariateTargets) else CovariateTargets.model_validate(targets)
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or label}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"covariates of {label!r}: {problems}") from None
    return out


def check_counts(counts: dict[str, int], labels: Collection[str]) -> None:
    """Clear errors for a request's counts against a model's labels (its card's: no model needs loading)."""
    if not counts:
        raise InvalidInput("ask for at least one label, e.g. --count lesion=100")
    unknown = sorted(set(counts) - set(labels))
    if unknown:
        raise InvalidInput(f"unknown label(s) {unknown}; valid labels are {sorted(labels)}")
    for label, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise InvalidInput(f"count for {label!r} must be a positive integer, got {n!r}")
    if sum(counts.values()) > MAX_SAMPLES:
        raise InvalidInput(f"{sum(counts.values())} samples requested; at most {MAX_SAMPLES} per cohort")


def check_covariates(covariates: dict[str, CovariateTargets], counts: dict[str, int], declared: dict | None) -> None:
    """Every label with targets is requested, and its targets fit the model."""
    extra = sorted(set(covariates) - set(counts))
    if extra:
        raise InvalidInput(f"covariates given for label(s) {extra} that the request does not ask for")
    for label, targets in covariates.items():
        targets.check(label, counts[label], declared)


class CohortSpec(BaseModel):
    """Counts per label and covariate targets per label: a ``--spec`` file, the core of a REST request."""

    model_config = ConfigDict(extra="forbid")
    counts: dict[str, int] = Field(..., min_length=1, max_length=64, description="label → number of samples")
    covariates: dict[str, CovariateTargets] = Field(
        default_factory=dict, max_length=64, description="label → covariate targets (age, sex); optional"
    )
    seed: int = Field(0, ge=0, le=2**62)

    def covariates_json(self) -> dict[str, dict]:
        return {label: t.model_dump(exclude_none=True) for label, t in self.covariates.items()}


class CohortCreate(CohortSpec):
    """A cohort request: how many samples of each label (with covariate targets, for a model trained on
    them), from which model, in which formats. The same :class:`CohortSpec` as the CLI's ``--spec`` file."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "model": "demo",
                "counts": {"healthy": 10, "lesion": 10},
                "covariates": {"lesion": {"age": {"min": 60, "max": 80}, "sex": {"F": 0.5, "M": 0.5}}},
                "seed": 0,
            }
        },
    )
    model: str = Field(..., min_length=1, max_length=128)
    formats: list[str] = Field(
        default_factory=lambda: ["nifti"], max_length=4, description="nifti (always), png, npz, dicom"
    )


def read_spec(path: str) -> CohortSpec:
    """A cohort spec from a YAML (or JSON) file; a clear :class:`InvalidInput` names what is wrong."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read the cohort spec {path}: {exc}") from None
    try:
        return CohortSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"the cohort spec is not valid: {problems}") from None


def targets_from_flags(age: str | None, sex: str | None) -> dict[str, Any]:
    """The CLI's ``--age 65|60-80`` and ``--sex F|F=0.5,M=0.5`` as targets (JSON) for every label."""
    targets: dict[str, Any] = {}
    try:
        if age:
            low, sep, high = age.partition("-")
            targets["age"] = {"min": int(low), "max": int(high)} if sep else int(age)
        if sex:
            if "=" in sex:
                targets["sex"] = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in sex.split(","))}
            else:
                targets["sex"] = sex.strip()
    except ValueError:
        raise InvalidInput("--age takes YEARS or MIN-MAX; --sex takes F, M or F=P,M=P") from None
    parse_covariates({"--age/--sex": targets})  # validate now, naming the flags in the error
    return targets
