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


@pytest.fixture(scope="session")
def canary_store(tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """A larger demo store (200 patients, 64 px, 4 slices each, 30 % held out) for filter calibration."""
    root = tmp_path_factory.mktemp("canary")
    make_demo_cohort(root / "raw", patients=200, seed=7, workers=2, dicom_fraction=0.0)
    options = IngestOptions(size=64, slices=4, holdout=0.3, seed=7, workers=2)
    return ingest(root / "raw", root / "store", labels_path=root / "raw" / "labels.csv", options=options)


@pytest.fixture(scope="session")
def unseen_store(tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """60 new patients from another seed: real patients no filter or model has ever seen."""
    root = tmp_path_factory.mktemp("unseen")
    make_demo_cohort(root / "raw", patients=60, seed=8, workers=2, dicom_fraction=0.0)
    options = IngestOptions(size=64, slices=4, holdout=0.0, workers=2)
    return ingest(root / "raw", root / "store", labels_path=root / "raw" / "labels.csv", options=options)


@pytest.fixture(scope="session")
def tiny_model(demo_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real DP model (16 px, a few steps) trained on the demo store, with its calibrated filter."""
    from app.calibrate import calibrate
    from generators.unet import UNetSize
    from train.dp_training import TrainConfig, train_model
    from train.presets import get_preset

    out = tmp_path_factory.mktemp("models") / "tiny"
    preset = get_preset(
        "cpu-small",
        image_size=16,
        unet=UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4),
        batch_size=6,
        physical_batch_size=6,
        epochs=3,
        public_pretrain_steps=20,
        public_batch_size=16,
    )
    train_model(TrainConfig(store=demo_store.store.path, out=out, preset=preset, epsilon=8.0, samples_per_label=2))
    calibrate(demo_store.store.path, out)
    return out
