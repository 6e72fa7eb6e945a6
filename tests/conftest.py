"""Shared fixtures: a small real demo cohort and its store, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.demo_cohort import DemoPatient, make_demo_cohort
from train.ingest import IngestOptions, IngestResult, ingest


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DemoPatient]]:
    """16 demo patients, half of them also as DICOM (single- and multi-frame)."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    plan = make_demo_cohort(out, patients=16, seed=3, workers=1, dicom_fraction=0.5)
    return out, plan


@pytest.fixture(scope="session")
def demo_store(demo_raw, tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    raw, _ = demo_raw
    out = tmp_path_factory.mktemp("store") / "store"
    return ingest(raw, out, labels_path=raw / "labels.csv", options=IngestOptions(size=32, slices=4, holdout=0.25))
