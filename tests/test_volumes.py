"""The 3-D path end to end on real files: ingest whole volumes, DP-train the 3-D model, calibrate the 3-D filter,
export a cohort of NIfTI volumes."""

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ingest_options, pin_patient_estimate
from test_api import free_port, new_key, start_server, wait_for

from app.audit import AuditSettings, run_audit
from app.calibrate import calibrate
from app.pipeline import CohortRequest, build_cohort
from generators.card import read_card
from generators.errors import InvalidInput
from generators.layout import BundleLayout
from generators.registry import load_generator
from generators.unet import UNet3DSize
from privacy_filters import MemorizationFilter
from privacy_filters.canaries import KINDS_3D
from train.accounting import epsilon_of
from train.dp_training import TrainConfig, TrainProgress, read_training_record, train_model
from train.ingest import ingest
from train.presets import get_preset
from train.store import CohortStore

TINY_3D = UNet3DSize(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=4)


@pytest.fixture(scope="module")
def volume_store(canary_store, tmp_path_factory: pytest.TempPathFactory) -> CohortStore:
    """The canary store's 200 demo patients as 24³ volumes (60 held out: enough to calibrate a filter); N̂ pinned
    to the 140 training patients."""
    raw = canary_store.store.path.parent / "raw"
    out = tmp_path_factory.mktemp("volumes") / "store"
    options = ingest_options(dims=3, size=24, keep_faces=True, holdout=0.3, workers=2, store_budget=1e6)
    ingest(raw, out, labels_path=raw / "labels.csv", options=options)
    pin_patient_estimate(out, 140)
    return CohortStore.open(out)


@pytest.fixture(scope="module")
def model_3d(volume_store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """A tiny 3-D DP model (12³, 3 steps) trained on the volume store: (bundle, card, progress reports)."""
    out = tmp_path_factory.mktemp("models3d") / "model3d"
    seen: list[TrainProgress] = []
    config = TrainConfig(
        store=volume_store.path, out=out, preset=tiny_3d_preset(), epsilon=8.0, max_steps=3, samples_per_label=1
    )
    return out, train_model(config, progress=seen.append).card.to_json(), seen


def tiny_3d_preset(**overrides):
    base = {
        "image_size": 12,  # the store's 24³ volumes are resized to the model's grid, as slices are in 2-D
        "unet": TINY_3D,
        "batch_size": 6,
        "physical_batch_size": 4,
        "epochs": 1,
        "checkpoint_every": 2,
        "public_pretrain_steps": 2,
        "public_batch_size": 2,
    }
    return get_preset("cpu-3d", **{**base, **overrides})


def test_a_3d_model_trains_with_patient_level_dp_and_loads_back(volume_store, model_3d) -> None:
    out, card, seen = model_3d
    assert [s.step for s in seen if s.phase == "public prior"] == [1, 2]
    assert [s.step for s in seen if s.phase == "dp"] == [1, 2, 3] and card["steps"] == 3
    typed = read_card(out)
    assert typed.generator == "diffusion-3d" and typed.spatial_dims == 3 and typed.image_shape == (12, 12, 12)
    assert "whole volume" in card["public_pretraining"]["data"] and "volume(s) per sampled patient" in card["sampling"]
    assert "inferior→superior" in card["orientation"]
    side = volume_store.spacing()[0] * 24 / 12
    assert card["voxel_spacing_mm"] == pytest.approx([side] * 3, abs=0.01)
    # patient-level Poisson sampling and accounting exactly as in 2-D
    assert card["sample_rate"] == pytest.approx(6 / 140)
    history = [tuple(m) for m in card["privacy_history"]]
    assert history[1] == (card["noise_multiplier"], card["sample_rate"], card["steps"])
    assert card["epsilon"] == pytest.approx(epsilon_of(history, delta=card["delta"])) and card["epsilon"] <= 8.08
    assert read_training_record(out)["n_train_patients"] == 140
    assert {"unet3d_config.json", "unet3d.safetensors"} <= {p.name for p in out.iterdir()}
    assert {"unfiltered_samples_healthy.png", "unfiltered_samples_lesion.png"} <= {
        p.name for p in (out / "private").iterdir()
    }
    assert "n_train" not in json.dumps(card)

    model = load_generator(out, device="cpu")
    a = model.generate(labels={"healthy": 1, "lesion": 1}, seed=3, steps=3)
    b = model.generate(labels={"healthy": 1, "lesion": 1}, seed=3, steps=3)
    assert a.images.shape == (2, 1, 12, 12, 12) and torch.equal(a.images, b.images)
    assert float(a.images.min()) >= -1 and float(a.images.max()) <= 1


def test_store_and_preset_must_agree_on_dimensions(volume_store, demo_store, tmp_path: Path) -> None:
    two_d = get_preset("cpu-small", image_size=16, public_pretrain_steps=0)
    with pytest.raises(InvalidInput, match="store holds volumes; use a 3-D preset"):
        train_model(TrainConfig(store=volume_store.path, out=tmp_path / "a", preset=two_d, epsilon=8.0))
    with pytest.raises(InvalidInput, match="ingested with --dims 3"):
        train_model(TrainConfig(store=demo_store.store.path, out=tmp_path / "b", preset=tiny_3d_preset(), epsilon=8.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(InvalidInput, match="every parameter"):
        tiny_3d_preset(trainable="conditioning")


def test_the_3d_filter_rejects_planted_copies_and_passes_unseen_patients(volume_store, tmp_path: Path) -> None:
    """At the store's 24³ (sub-voxel shifts slip through below about 20³: BENCHMARKS.md)."""
    train, holdout = volume_store.read("train"), volume_store.read("holdout")
    built = MemorizationFilter.build(
        np.asarray(train.images), np.asarray(holdout.images), holdout_groups=holdout.patients
    )
    built.save(tmp_path / "filter")
    filt = MemorizationFilter.load(tmp_path / "filter")
    record = filt.record
    assert record["spatial_dims"] == 3 and record["embedding"] == "aligned-pyramid"
    assert record["n_holdout_patients"] == 60 and record["holdout_acceptance_rate"] >= 0.85
    assert set(record["canary_rejection_by_kind"]) == set(KINDS_3D)
    assert record["canary_rejection_rate"] >= 0.99, record["canary_rejection_by_kind"]
    assert filt.image_shape == (24, 24, 24)
    assert (filt.distances(np.asarray(train.images[:20])) < 1.0).all()  # a training volume itself never passes
    with pytest.raises(InvalidInput, match="built for 24x24x24"):
        filt.distances(np.asarray(train.images[:4, :, 0]))


def test_a_3d_cohort_is_exported_as_oriented_nifti_volumes(volume_store, model_3d, tmp_path: Path) -> None:
    out, card, _ = model_3d
    if not (BundleLayout(out).filter_dir / "filter.json").is_file():
        calibrate(volume_store.path, out)
    filt = MemorizationFilter.load(BundleLayout(out).filter_dir)
    assert filt.spatial_dims == 3 and filt.image_shape == (12, 12, 12)  # the model's grid
    manifest = build_cohort(
        out, CohortRequest(counts={"healthy": 2, "lesion": 1}, formats=("nifti", "png"), steps=3), tmp_path / "c"
    )
    assert manifest["dataset"]["generator"] == "diffusion-3d" and manifest["dataset"]["image_shape"] == [12, 12, 12]
    rows = manifest["samples"]
    assert sorted(r["label"] for r in rows) == ["healthy", "healthy", "lesion"]
    spacing = card["voxel_spacing_mm"][0]
    for row in rows:
        image = nib.load(tmp_path / "c" / row["file"])
        assert image.shape == (12, 12, 12) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), spacing)
    assert len(list((tmp_path / "c" / "previews").rglob("*.png"))) == 3
    report = json.loads((tmp_path / "c" / "privacy_report.json").read_text())
    assert report["differential_privacy"]["epsilon"] == card["epsilon"]
    assert set(report["memorization_filter"]["canary_rejection_by_kind"]) == set(KINDS_3D)


def test_the_audit_measures_a_3d_model(volume_store, model_3d, tmp_path: Path) -> None:
    out, _, _ = model_3d
    if not (BundleLayout(out).filter_dir / "filter.json").is_file():
        calibrate(volume_store.path, out)
    settings = AuditSettings(
        n=6,
        classifier_steps=10,
        classifier_seeds=1,
        mia_timesteps=(50, 200),
        ms_ssim_pairs=5,
        canary_sources=8,
        include_neighbours=True,
        sampler_steps=3,
    )
    report = run_audit(volume_store.path, out, tmp_path / "report", settings)
    utility = report.utility
    assert "3-D" in utility.classifier and "volumes" in utility.test_set
    n_holdout = len(volume_store.read("holdout").images)
    accuracy = utility.trtr.per_seed[0]["accuracy"]
    assert abs(accuracy * n_holdout - round(accuracy * n_holdout)) < 1e-6  # a share of held-out volumes
    assert set(report.privacy.filter.canaries.curves) == set(KINDS_3D) - {"exact", "flip"}
    assert 0.0 <= report.privacy.dcr.share_filtered <= 1.0
    assert (tmp_path / "report" / "report.html").is_file() and (
        tmp_path / "report" / "figures" / "neighbours.png"
    ).is_file()


def test_the_rest_service_serves_a_3d_model_and_its_volumes(volume_store, model_3d, tmp_path: Path) -> None:
    """A real uvicorn: the card says volumes, a cohort job finishes, its files and archive hold RAS+ volumes."""
    out, card, _ = model_3d
    if not (BundleLayout(out).filter_dir / "filter.json").is_file():
        calibrate(volume_store.path, out)
    (tmp_path / "models").mkdir()
    shutil.copytree(out, tmp_path / "models" / "volumes")
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(tmp_path / "data")}
    headers = {"Authorization": f"Bearer {new_key(env, '--role', 'researcher')}"}
    port = free_port()
    proc = start_server(tmp_path / "models", env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        served = httpx.get(f"{base}/v1/models/volumes", headers=headers).json()
        assert served["generator"] == "diffusion-3d" and served["spatial_dims"] == 3
        assert served["image_shape"] == [12, 12, 12] and served["epsilon"] == card["epsilon"]
        body = {"model": "volumes", "counts": {"healthy": 1, "lesion": 1}, "seed": 3}
        created = httpx.post(f"{base}/v1/cohorts", headers=headers, json=body)
        assert created.status_code == 202, created.text
        job = wait_for(base, headers, created.json()["id"])
        assert job["status"] == "succeeded" and job["done"] == 2, job
        samples = httpx.get(f"{base}/v1/datasets/{job['id']}", headers=headers).json()["manifest"]["samples"]
        archive = httpx.get(f"{base}/v1/datasets/{job['id']}/archive", headers=headers)
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
            for row in samples:
                (tmp_path / "v.nii.gz").write_bytes(zf.read(row["file"]))
                volume = nib.load(tmp_path / "v.nii.gz")
                assert volume.shape == (12, 12, 12) and nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
