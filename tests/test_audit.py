"""`synthcohort audit` end to end on the tiny real model: report contents, privacy of the report, bad input."""

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.audit import RECIPE_KEYS, AuditSettings, run_audit
from app.audit_schema import AuditReport
from generators.errors import Conflict, InvalidInput

FAST = {
    "n": 6,
    "classifier_steps": 15,
    "classifier_seeds": 2,
    "mia_timesteps": (50, 200),
    "ms_ssim_pairs": 10,
    "sampler_steps": 4,
}


@pytest.fixture(scope="module")
def audited(tiny_model: Path, canary_store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AuditReport]:
    out = tmp_path_factory.mktemp("audit") / "report"
    report = run_audit(canary_store.store.path, tiny_model, out, AuditSettings(**FAST))
    return out, report


def _is_multiple(value: float, unit: float) -> bool:
    return abs(value / unit - round(value / unit)) < 1e-6


def test_report_numbers_have_the_structure_their_definitions_force(audited, tiny_model: Path) -> None:
    """Properties a broken metric would violate (not just "between 0 and 1"): an accuracy is a count of correct
    test slices, an AUC is a Mann–Whitney count over member × non-member pairs, a DCR share counts samples."""
    out, report = audited
    on_disk = json.loads((out / "report.json").read_text())
    assert AuditReport.model_validate(on_disk).to_json() == report.to_json()  # report.json: the typed report, whole
    u, store = on_disk["utility"], on_disk["store"]
    n_test = store["n_holdout_slices"]
    for name in ("trtr", "tstr", "tstr_small_n"):
        runs = u[name]["per_seed"]
        assert len(runs) == 2 and all(_is_multiple(r["accuracy"], 1 / n_test) for r in runs)
        assert u[name]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in runs]))
        assert u[name]["accuracy_sd"] == pytest.approx(np.std([r["accuracy"] for r in runs]))
    assert u["ratio"]["accuracy"] == pytest.approx(u["tstr"]["accuracy"] / u["trtr"]["accuracy"])
    assert u["ratio_small_n"]["accuracy"] == pytest.approx(u["tstr_small_n"]["accuracy"] / u["trtr"]["accuracy"])
    # the fair protocol: TSTR trains on as many synthetic slices as TRTR has real ones; the small set is kept beside
    assert f"TSTR trains on {store['n_train_slices']} synthetic slices" in u["protocol"]
    assert f"cohort's {2 * FAST['n']}" in u["protocol"]
    assert on_disk["covariates"] is None  # a model trained by label only has no covariate section
    fr = on_disk["fidelity"]["frechet"]
    for space in ("classifier_features", "filter_embedding"):
        f = fr[space]
        assert f["train_vs_holdout"] > 0 and f["ratio"] == pytest.approx(
            f["synthetic_vs_holdout"] / f["train_vs_holdout"]
        )
    assert set(on_disk["fidelity"]["ms_ssim"]["synthetic"]) <= {"healthy", "lesion"}
    p = on_disk["privacy"]
    distances = p["dcr"]["distances_to_train"]
    n_filtered, n_raw = len(distances["synthetic_filtered"]), len(distances["synthetic_unfiltered"])
    assert _is_multiple(p["dcr"]["share_filtered"], 0.5 / n_filtered)
    # every released sample passed the filter; the unfiltered batch has all 2 × n samples and its catch rate
    # is exactly the share of it below the threshold
    threshold = distances["filter_threshold"]
    assert all(d >= threshold for d in distances["synthetic_filtered"])
    assert n_raw == 2 * FAST["n"]
    below = np.mean(np.array(distances["synthetic_unfiltered"]) < threshold)
    assert p["filter"]["catch_rate_unfiltered"] == pytest.approx(below)
    loss = p["membership_inference"]["loss"]
    assert loss["n_members"] == store["n_train_patients"] and loss["n_nonmembers"] == store["n_holdout_patients"]
    assert _is_multiple(loss["auc"], 0.5 / (loss["n_members"] * loss["n_nonmembers"]))
    assert loss["fpr"][0] == 0.0 and loss["tpr"][-1] == 1.0 and loss["fpr"] == sorted(loss["fpr"])
    bound = p["dp_bound"]
    assert bound["private"] and bound["epsilon"] == pytest.approx(on_disk["model"]["epsilon"])
    # the report names the recipe that produced the model, as the card recorded it
    card = json.loads((tiny_model / "model_card.json").read_text())
    assert on_disk["model"]["recipe"] == {k: card["preset"][k] for k in RECIPE_KEYS}
    assert on_disk["model"]["recipe"]["trainable"] == card["trainable_parameters"]["set"]
    # the curve over δ can only tighten the ceiling given by the card's single (ε, δ)
    assert bound["tpr_at_low_fpr"] <= bound["tpr_at_low_fpr_card_pair_only"] + 1e-12
    assert 0.5 <= bound["auc"] <= bound["auc_card_pair_only"] + 1e-12
    assert on_disk["cohort"]["reproduce"].startswith("synthcohort export MODEL_DIR --n 6 --seed 0")
    assert on_disk["cohort"]["generated"] >= on_disk["cohort"]["accepted"] == 2 * FAST["n"]
    assert on_disk["timings_s"]["total"] > 0


def test_report_is_private_self_contained_and_shows_no_training_images(audited) -> None:
    out, _ = audited
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "PRIVATE").is_file() and stat.S_IMODE((out / "report.json").stat().st_mode) == 0o600
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "neighbours.png" not in figures
    assert {"dcr.png", "mia_roc.png", "utility.png", "intensity.png"} <= set(figures)
    assert any(name.startswith("samples_") for name in figures)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    assert not re.search(r'(src|href)="(?!data:)', page), "the HTML must not load anything from outside"
    assert "INTERNAL AUDIT REPORT" in page and "TSTR" in page
    assert not (out / "cohort").exists() and not list(out.parent.glob(".*.tmp"))


def test_existing_report_is_refused_then_replaced_with_force(audited, tiny_model: Path, canary_store) -> None:
    out, _ = audited
    before = (out / "report.json").read_text()
    with pytest.raises(Conflict):
        run_audit(canary_store.store.path, tiny_model, out, AuditSettings(**FAST))
    assert (out / "report.json").read_text() == before


def test_cli_with_neighbours_and_force(tiny_model: Path, canary_store, tmp_path: Path) -> None:
    out = tmp_path / "with-neighbours"
    args = [sys.executable, "-m", "app.cli", "audit", str(canary_store.store.path), str(tiny_model), "--out", str(out)]
    args += ["--n", "4", "--classifier-steps", "10", "--classifier-seeds", "1", "--include-neighbours"]
    args += ["--no-matched-tstr"]  # the fair protocol's large synthetic set is tested through run_audit above
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "TSTR accuracy" in done.stdout and "membership inference" in done.stdout
    utility = json.loads((out / "report.json").read_text())["utility"]
    assert utility["tstr_small_n"] is None and "released cohort's 8 synthetic" in utility["protocol"]
    assert (out / "figures" / "neighbours.png").is_file()
    assert "neighbours" in (out / "report.html").read_text()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 4 and "already exists" in again.stderr


def test_wrong_store_and_bad_settings_are_refused(tiny_model: Path, canary_store, demo_store, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not the one the model was trained on"):
        run_audit(demo_store.store.path, tiny_model, tmp_path / "r", AuditSettings(**FAST))
    with pytest.raises(InvalidInput, match="--n"):
        run_audit(canary_store.store.path, tiny_model, tmp_path / "r", AuditSettings(**{**FAST, "n": 1}))
    with pytest.raises(InvalidInput, match="timesteps"):
        run_audit(
            canary_store.store.path, tiny_model, tmp_path / "r", AuditSettings(**{**FAST, "mia_timesteps": (1000,)})
        )
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".*"))


def test_a_model_the_pipeline_refuses_is_still_audited_with_the_finding(tiny_model: Path, canary_store, tmp_path: Path):
    strict = tmp_path / "strict"
    shutil.copytree(tiny_model, strict)
    meta_path = strict / "private" / "filter" / "filter.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = 1e9  # every output now sits "closer than unseen patients": the pipeline must refuse
    meta_path.write_text(json.dumps(meta))
    report = run_audit(canary_store.store.path, strict, tmp_path / "r", AuditSettings(**FAST))
    assert report.cohort.pipeline_stopped and "appears to memorize" in str(report.cohort.finding)
    assert report.cohort.source.startswith("the whole unfiltered batch")
    assert report.privacy.filter.catch_rate_unfiltered == 1.0
    assert "FINDING: the release pipeline refused this model" in (tmp_path / "r" / "report.html").read_text()
