"""Covariate conditioning (age, sex): the condition embedding, exact per-patient gradients, training, the
request schema and its expansion, and a cohort that carries the requested values into manifest and DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from app.cohort_spec import CohortSpec, CovariateTargets, parse_covariates
from generators.covariates import (
    AGE_NULL,
    SEX_NULL,
    ConditionEmbedding,
    attach_condition_embedding,
    condition_ids,
    encode,
    null_condition,
)
from generators.diffusion import noise_schedule, training_scheduler
from generators.errors import InvalidInput
from generators.registry import load_generator
from generators.unet import UNetSize, build_unet, use_plain_attention
from train.demo_cohort import plan_patients, synthesize_volume
from train.per_patient_grads import brute_force_per_patient_grads, make_per_patient_grad_fn

TINY = UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4)
CLI = [sys.executable, "-m", "app.cli"]


def test_condition_ids_decode_to_their_parts() -> None:
    """Every (label, sex, age) packs into one id that the embedding reads back part by part."""
    embedding = ConditionEmbedding(n_classes=3, dim=8)
    torch.nn.init.normal_(embedding.age[2].weight)  # make the age term depend on the age
    labels, sexes, ages = torch.meshgrid(
        torch.arange(4), torch.arange(3), torch.tensor([0, 18, 65, 90, AGE_NULL]), indexing="ij"
    )
    ids = encode(labels.flatten(), sexes.flatten(), ages.flatten(), 3)
    assert len(set(ids.tolist())) == ids.numel()  # one id per combination
    out = embedding(ids)
    for i, (label, sex, age) in enumerate(zip(labels.flatten(), sexes.flatten(), ages.flatten(), strict=True)):
        single = embedding(encode(label, sex, torch.tensor(AGE_NULL), 3)) - embedding.age_null
        if int(age) == AGE_NULL:
            torch.testing.assert_close(out[i], single + embedding.age_null)
        else:
            assert not torch.allclose(out[i], single + embedding.age_null)
        assert torch.equal(embedding.label(label) + embedding.sex(sex), single)
    assert null_condition(3) == int(encode(torch.tensor(3), torch.tensor(SEX_NULL), torch.tensor(AGE_NULL), 3))


def test_a_fresh_covariate_embedding_starts_at_the_null_condition() -> None:
    """After the prior (null conditions only), every label/sex/age embeds like the null: DP training starts
    from the prior's samples and learns what the conditions add."""
    embedding = ConditionEmbedding(n_classes=2, dim=8)
    embedding.start_at_null()
    ids = condition_ids([0, 1, 1], [{"age": 20, "sex": "F"}, {"age": 85}, {"sex": "M"}], 2)
    torch.testing.assert_close(embedding(ids), embedding(torch.tensor([null_condition(2)] * 3)))


def test_per_patient_gradients_of_a_covariate_model_are_exact() -> None:
    torch.manual_seed(0)
    model = attach_condition_embedding(build_unet(image_size=16, n_classes=2, size=TINY), 2)
    use_plain_attention(model)
    torch.nn.init.normal_(model.class_embedding.age[2].weight, std=0.1)  # a non-zero age path
    alphas = noise_schedule(training_scheduler("sample"))
    gen = torch.Generator().manual_seed(1)
    b, k = 3, 2
    images = (torch.rand(b, k, 1, 16, 16, generator=gen) * 2 - 1).contiguous()
    conditions = encode(
        torch.randint(0, 3, (b, k), generator=gen),
        torch.randint(0, 3, (b, k), generator=gen),
        torch.randint(0, AGE_NULL + 1, (b, k), generator=gen),
        2,
    )
    timesteps, noise = torch.randint(0, 1000, (b, k), generator=gen), torch.randn(b, k, 1, 16, 16, generator=gen)
    fn = make_per_patient_grad_fn(model, alphas, "sample")
    grads, _ = fn({n: p.detach() for n, p in model.named_parameters()}, images, conditions, timesteps, noise)
    reference = brute_force_per_patient_grads(model, alphas, "sample", images, conditions, timesteps, noise)
    assert "class_embedding.age.2.weight" in reference
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-6, msg=name)
    assert reference["class_embedding.age.2.weight"].abs().sum() > 0


def test_targets_expand_deterministically_and_exactly() -> None:
    targets = CovariateTargets.model_validate({"age": {"min": 60, "max": 80}, "sex": {"F": 0.5, "M": 0.5}})
    rows = targets.expand("lesion", 11, seed=4)
    assert rows == targets.expand("lesion", 11, seed=4)  # same request, same covariates
    assert rows != targets.expand("lesion", 11, seed=5)
    assert all(60 <= r["age"] <= 80 for r in rows)
    assert sorted(r["sex"] for r in rows).count("F") in (5, 6)  # half, up to rounding
    exact = CovariateTargets.model_validate({"age": [30, 40], "sex": "M"}).expand("healthy", 2, seed=0)
    assert exact == [{"age": 30, "sex": "M"}, {"age": 40, "sex": "M"}]
    assert CovariateTargets.model_validate({"sex": "F"}).expand("x", 2, seed=0) == [{"sex": "F"}, {"sex": "F"}]
    histogram = CovariateTargets.model_validate({"age": {"histogram": {"20-29": 0.25, "60-69": 0.75}}})
    ages = [r["age"] for r in histogram.expand("lesion", 8, seed=1)]
    assert sum(20 <= a <= 29 for a in ages) == 2 and sum(60 <= a <= 69 for a in ages) == 6
    with pytest.raises(InvalidInput, match="18-90"):
        CovariateTargets.model_validate({"age": {"histogram": {"10-19": 1.0}}}).check(
            "lesion", 8, {"age": {"min": 18, "max": 90}}
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"age": {"min": 80, "max": 60}},
        {"age": 120},
        {"age": True},
        {"age": {"histogram": {"60-69": 0.5}}},
        {"age": {"histogram": {"sixties": 1.0}}},
        {"sex": "X"},
        {"sex": {"F": 0.7, "M": 0.7}},
        {"height": 180},
        "not a mapping",
    ],
)
def test_bad_targets_are_refused_with_the_label_named(bad) -> None:
    with pytest.raises(InvalidInput, match="lesion"):
        parse_covariates({"lesion": bad})


def test_targets_are_checked_against_the_model_declaration() -> None:
    declared = {"age": {"min": 18, "max": 90, "unit": "years"}}
    spec = CohortSpec.model_validate({"counts": {"lesion": 2}, "covariates": {"lesion": {"age": [17, 60]}}})
    with pytest.raises(InvalidInput, match="18-90"):
        spec.covariates["lesion"].check("lesion", 2, declared)
    with pytest.raises(InvalidInput, match="not trained on sex"):
        CovariateTargets(sex="F").check("lesion", 2, declared)
    with pytest.raises(InvalidInput, match="not trained on covariates"):
        CovariateTargets(age=50).check("lesion", 2, None)
    with pytest.raises(InvalidInput, match="1 values for 2"):
        CovariateTargets(age=[50]).check("lesion", 2, declared)


def test_demo_anatomy_ages_and_differs_by_sex() -> None:
    """The demo cohort's documented anatomy: with age the brain shrinks and the central CSF (ventricles)
    grows; male brains are larger. Same patient, only age or sex changed."""
    patient = replace(plan_patients(2, seed=0)[0], label="healthy")

    def measure(age: int, sex: str) -> tuple[int, int]:
        volume, _ = synthesize_volume(replace(patient, age=age, sex=sex), seed=0)
        x, y, z = volume.shape
        centre = volume[x // 2 - 12 : x // 2 + 12, y // 2 - 14 : y // 2 + 14, z // 2 - 4 : z // 2 + 8]
        brain = volume > 350
        return int(brain.sum()), int((centre < 350).sum())

    young, old, male = measure(20, "F"), measure(90, "F"), measure(20, "M")
    assert old[0] < 0.9 * young[0]  # brain volume falls
    assert old[1] > 1.2 * young[1]  # ventricles widen
    assert male[0] > 1.05 * young[0]


@pytest.fixture(scope="module")
def covariate_model(canary_store, tmp_path_factory) -> Path:
    """A tiny DP model conditioned on label, age and sex, trained on the 200-patient canary store, calibrated."""
    from app.calibrate import calibrate
    from train.dp_training import TrainConfig, train_model
    from train.presets import get_preset

    out = tmp_path_factory.mktemp("covariates") / "model"
    preset = get_preset(
        "cpu-small",
        image_size=16,
        unet=TINY,
        batch_size=8,
        physical_batch_size=8,
        epochs=1,
        public_pretrain_steps=4,
        public_batch_size=8,
    )
    declared = {"age": {"min": 18, "max": 90}, "sex": ["F", "M"]}
    store = canary_store.store.path
    config = TrainConfig(
        store=store,
        out=out,
        preset=preset,
        epsilon=8.0,
        covariates=declared,
        samples_per_label=2,
        allow_over_budget=True,
    )
    train_model(config)
    calibrate(store, out)
    return out


def test_a_covariate_model_declares_and_honours_its_conditions(covariate_model: Path) -> None:
    card = json.loads((covariate_model / "model_card.json").read_text())
    assert card["covariates"] == {"age": {"min": 18, "max": 90, "unit": "years"}, "sex": ["F", "M"]}
    model = load_generator(covariate_model)
    ask = {"labels": ["lesion"] * 2, "seed": 0, "seeds": [7, 7], "steps": 3}
    young_old = model.generate(conditions=[{"age": 20, "sex": "F"}, {"age": 88, "sex": "F"}], **ask)
    again = model.generate(conditions=[{"age": 20, "sex": "F"}, {"age": 88, "sex": "F"}], **ask)
    assert torch.equal(young_old.images, again.images)  # deterministic
    assert not torch.equal(young_old.images[0], young_old.images[1])  # same noise, other age: other image
    open_ended = model.generate(conditions=[{}, {"sex": "M"}], **ask)
    assert not torch.equal(open_ended.images[0], open_ended.images[1])
    with pytest.raises(InvalidInput, match="18-90"):
        model.generate(conditions=[{"age": 5}], labels=["lesion"], seed=0, steps=2)


def test_export_with_a_spec_writes_the_requested_covariates(covariate_model: Path, tmp_path: Path) -> None:
    spec = tmp_path / "cohort.yaml"
    spec.write_text(
        "counts: {lesion: 4, healthy: 2}\n"
        "covariates:\n"
        "  lesion: {age: {min: 60, max: 80}, sex: {F: 0.5, M: 0.5}}\n"
        "  healthy: {age: [25, 35]}\n"
        "seed: 3\n"
    )
    out = tmp_path / "cohort"
    done = subprocess.run(
        [*CLI, "export", str(covariate_model), "--out", str(out), "--spec", str(spec), "--format", "nifti,dicom"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    samples = json.loads((out / "manifest.json").read_text())["samples"]
    lesion = [s for s in samples if s["label"] == "lesion"]
    assert sorted(s["sex"] for s in lesion) == ["F", "F", "M", "M"] and all(60 <= s["age"] <= 80 for s in lesion)
    assert [s["age"] for s in samples if s["label"] == "healthy"] == [25, 35]
    assert all("sex" not in s for s in samples if s["label"] == "healthy")  # left open
    header = (out / "manifest.csv").read_text().splitlines()[0].split(",")
    assert {"age", "sex"} <= set(header)
    for sample in samples:
        dicom = pydicom.dcmread(next((out / sample["dicom"]).glob("*.dcm")))
        assert dicom.PatientAge == f"{sample['age']:03d}Y"
        assert dicom.PatientSex == sample.get("sex", "")


def test_covariates_do_not_depend_on_sharding(covariate_model: Path, tmp_path: Path) -> None:
    from app.pipeline import CohortRequest, build_cohort

    covariates = {"lesion": {"age": {"min": 30, "max": 70}, "sex": {"F": 0.25, "M": 0.75}}}
    rows = []
    for shard_size in (2, 64):
        request = CohortRequest(counts={"lesion": 5}, seed=9, covariates=covariates, shard_size=shard_size)
        manifest = build_cohort(covariate_model, request, tmp_path / f"s{shard_size}")
        rows.append([(s["index"], s["age"], s["sex"], s["seed"]) for s in manifest["samples"]])
    assert rows[0] == rows[1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("counts: {lesion: 2}\ncovariates: {lesion: {age: 10}}\n", "18-90"),
        ("counts: {lesion: 2}\ncovariates: {healthy: {sex: F}}\n", "does not ask for"),
        ("counts: {lesion: 2}\ncovariates: {lesion: {weight: 80}}\n", "weight"),
        ("counts: [1\n", "cannot read the cohort spec"),
    ],
)
def test_bad_specs_exit_2_and_leave_nothing(covariate_model: Path, tmp_path: Path, spec: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(spec)
    out = tmp_path / "cohort"
    done = subprocess.run(
        [*CLI, "export", str(covariate_model), "--out", str(out), "--spec", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and message in done.stderr
    assert not out.exists() and not any(tmp_path.glob(".cohort*"))


def test_a_model_without_covariates_refuses_them(tiny_model: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "export", str(tiny_model), "--out", str(tmp_path / "c"), "--n", "2", "--age", "40-50"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "not trained on covariates" in done.stderr


def test_condition_ids_of_unknown_store_values_are_null() -> None:
    """Store rows with unknown age (-1) or sex (U) train the null of that part."""
    from train.dp_training import PatientSlices

    slices = PatientSlices(
        np.array(["a", "a", "b", "c"]),
        np.array([0, 0, 1, 1]),
        np.array([40, 40, -1, 95]),
        np.array(["F", "F", "U", "M"]),
    )
    assert slices.age_ids.tolist() == [40, AGE_NULL, 90] and slices.sex_ids.tolist() == [0, SEX_NULL, 1]


def test_rest_cohort_with_covariates(covariate_model: Path, tmp_path: Path) -> None:
    """The REST body takes the same covariate targets; the job keeps them (a database column, migration 0004),
    the dataset's manifest carries them, and bad targets are a 422 that names the problem."""
    import shutil

    import httpx
    from conftest import fresh_database
    from test_api import new_key, running_server, service_env, wait_for

    models = tmp_path / "models"
    shutil.copytree(covariate_model, models / "aged")
    with fresh_database("sqlite", tmp_path) as url:
        env = service_env(tmp_path, url)
        headers = {"Authorization": f"Bearer {new_key(env, '--role', 'researcher')}"}
        with running_server(models, env) as base:
            card = httpx.get(f"{base}/v1/models/aged", headers=headers).json()
            assert card["covariates"] == {"age": {"min": 18, "max": 90, "unit": "years"}, "sex": ["F", "M"]}
            covariates = {"lesion": {"age": {"min": 70, "max": 80}, "sex": "F"}}
            body = {"model": "aged", "counts": {"lesion": 3, "healthy": 1}, "covariates": covariates, "seed": 2}
            created = httpx.post(f"{base}/v1/cohorts", headers=headers, json=body)
            assert created.status_code == 202, created.text
            assert created.json()["covariates"] == covariates
            job = wait_for(base, headers, created.json()["id"])
            assert job["status"] == "succeeded", job
            samples = httpx.get(f"{base}/v1/datasets/{job['id']}", headers=headers).json()["manifest"]["samples"]
            lesion = [s for s in samples if s["label"] == "lesion"]
            assert len(lesion) == 3 and all(70 <= s["age"] <= 80 and s["sex"] == "F" for s in lesion)
            assert all("age" not in s for s in samples if s["label"] == "healthy")
            for bad, words in (
                ({"lesion": {"age": 10}}, "18-90"),
                ({"lesion": {"age": [70]}}, "1 values for 3"),
                ({"healthy": {"age": [20, 30]}}, "2 values for 1"),
                ({"tumour": {"sex": "F"}}, "does not ask for"),
                ({"lesion": {"sex": "X"}}, "sex"),
            ):
                refused = httpx.post(f"{base}/v1/cohorts", headers=headers, json={**body, "covariates": bad})
                assert refused.status_code == 422 and words in refused.text, refused.text


def test_the_audit_reports_covariate_fidelity(covariate_model: Path, canary_store, tmp_path: Path) -> None:
    """A covariate model's audit scores an age regressor and a sex classifier (trained on real training images)
    on real held-out images and on synthetic images against the values they were generated for."""
    from app.audit import AuditSettings, run_audit

    n = 6
    settings = AuditSettings(
        n=n, classifier_steps=15, classifier_seeds=1, mia_timesteps=(50,), ms_ssim_pairs=10, matched_tstr=False
    )  # the fair protocol's large synthetic set has its own test (test_audit.py)
    report = run_audit(canary_store.store.path, covariate_model, tmp_path / "audit", settings)
    c = report.covariates
    assert c["requested"] == {"age": {"min": 18, "max": 90}, "sex": {"F": 0.5, "M": 0.5}}
    assert c["synthetic_samples"] == 2 * n
    holdout = canary_store.store.read("holdout")
    train_ages = canary_store.store.read("train").ages
    expected = np.abs(train_ages[train_ages >= 0].mean() - holdout.ages[holdout.ages >= 0]).mean()
    assert c["age"]["mae_constant_real_holdout"] == pytest.approx(expected)
    assert c["age"]["mae_synthetic"] >= 0 and np.isfinite(c["age"]["correlation_real_holdout"])
    known = np.isin(holdout.sexes, ["F", "M"]).sum()
    assert abs(c["sex"]["accuracy_real_holdout"] * known - round(c["sex"]["accuracy_real_holdout"] * known)) < 1e-6
    assert abs(c["sex"]["accuracy_synthetic"] * 2 * n - round(c["sex"]["accuracy_synthetic"] * 2 * n)) < 1e-6
    html = (tmp_path / "audit" / "report.html").read_text()
    assert "<h2>Covariates</h2>" in html and "Age MAE" in html
