"""Shared fixtures: a small real demo cohort and its store, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generators.card import ModelCard
from train.demo_cohort import DemoPatient, make_demo_cohort
from train.ingest import IngestOptions, IngestResult, ingest
from train.store import CohortStore


def tiny_card(*, image_size: int = 16, labels: tuple[str, ...] = ("healthy", "lesion"), **fields) -> ModelCard:
    """A valid card for a model built in a test (not trained by ``train_model``): not private unless told."""
    base = {
        "created": "2026-11-22",
        "generator": "diffusion-2d",
        "spatial_dims": 2,
        "labels": {name: i for i, name in enumerate(labels)},
        "image_size": image_size,
        "voxel_spacing_mm": [1.0, 1.0, 1.0],
        "dp": False,
    }
    return ModelCard.parse({**base, **fields})


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DemoPatient]]:
    """16 demo patients, half of them also as DICOM (single- and multi-frame)."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    plan = make_demo_cohort(out, patients=16, seed=3, workers=1, dicom_fraction=0.5)
    return out, plan


def pin_patient_estimate(store_path: Path, value: int) -> None:
    """Tests only: replace a store's DP patient estimate N̂ (drawn from OS entropy) with a known value, so that
    q = B / N̂ and step counts are deterministic."""
    meta_path = store_path / "store.json"
    meta = json.loads(meta_path.read_text())
    meta["patients_estimate"]["value"] = value
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def demo_store(demo_raw, tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """The 16-patient store many training tests share: N̂ pinned to the 12 training patients, and a privacy
    budget large enough for all of them."""
    raw, _ = demo_raw
    out = tmp_path_factory.mktemp("store") / "store"
    options = IngestOptions(size=32, slices=4, holdout=0.25, store_budget=1e6)
    result = ingest(raw, out, labels_path=raw / "labels.csv", options=options)
    pin_patient_estimate(out, 12)
    return IngestResult(store=CohortStore.open(out), report=result.report, skipped=result.skipped)


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
def tiny_model(canary_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real DP model (16 px, a few steps) trained on the canary store (60 held-out patients, enough to
    calibrate a filter), with its calibrated filter."""
    from app.calibrate import calibrate
    from generators.unet import UNetSize
    from train.dp_training import TrainConfig, train_model
    from train.presets import get_preset

    out = tmp_path_factory.mktemp("models") / "tiny"
    preset = get_preset(
        "cpu-small",
        image_size=16,
        unet=UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4),
        batch_size=8,
        physical_batch_size=8,
        epochs=1,
        public_pretrain_steps=20,
        public_batch_size=16,
    )
    train_model(TrainConfig(store=canary_store.store.path, out=out, preset=preset, epsilon=8.0, samples_per_label=2))
    calibrate(canary_store.store.path, out)
    return out
