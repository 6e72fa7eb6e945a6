"""Ingestion end to end on real files: de-identification, patient split, store layout, bad input."""

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_options

from generators.errors import Conflict, InvalidInput, NotFound
from train.demo_cohort import make_demo_cohort, write_dicom_series
from train.ingest import IngestOptions, NothingUsable, ingest
from train.store import CohortStore


def phi_strings(plan) -> set[str]:
    """Every identifying value the raw demo files carry, in the spellings a leak could take."""
    values = set()
    for p in plan:
        last, first = p.name.split("^")
        values |= {p.patient_id, p.patient_id[3:], p.birth_date, p.accession, p.institution, last, first, p.study_date}
        values |= {p.physician.split("^")[0], "SPRINGFIELD"}
    return {v for v in values if len(v) >= 4}


def train_set(result) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(result.store.read("train").images)}


def all_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_store_has_no_phi_in_any_byte(demo_raw, demo_store) -> None:
    raw, plan = demo_raw
    blob = all_bytes(demo_store.store.path)
    raw_blob = all_bytes(raw / "dicom")
    phi = phi_strings(plan)
    present_in_raw = {v for v in phi if v.encode() in raw_blob}
    assert len(present_in_raw) > 10  # the DICOM inputs really carry PHI
    for value in phi:
        for spelling in {value, value.lower(), value.title()}:
            assert spelling.encode() not in blob, f"PHI value leaked into the store: {spelling}"


def test_store_layout_permissions_and_split(demo_raw, demo_store) -> None:
    store = demo_store.store
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    names = {p.name for p in store.path.iterdir()}
    assert names == {
        "PRIVATE",
        "store.json",
        "images.npy",
        "index.csv",
        "ingest_report.json",
        "privacy_ledger.jsonl",
        "secret.key",
    }
    for path in store.path.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path.name

    train, holdout = store.read("train"), store.read("holdout")
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == np.float32
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    assert len(train.images) == len(train.labels) == len(train.patients)
    assert set(train.patients).isdisjoint(set(holdout.patients))  # a patient is never in both splits
    # stratified: 16 patients, 8 per label, 25 % holdout → 2 per label held out
    report = demo_store.report
    assert report["patients"] == {"holdout": {"healthy": 2, "lesion": 2}, "train": {"healthy": 6, "lesion": 6}}
    assert store.label_names == ["healthy", "lesion"]
    assert len(set(train.patients)) == 12 and len(set(holdout.patients)) == 4
    # demo patients also written as DICOM have two scans: 4 slices each
    _, plan = demo_raw
    assert report["patients_with_multiple_scans"] == sum(1 for p in plan if p.dicom)
    assert store.n_slices == 4 * (16 + report["patients_with_multiple_scans"])
    rows = store.index()
    assert {r["sex"] for r in rows} <= {"F", "M"}
    assert max(int(r["age"]) for r in rows) <= 90
    assert store.spacing() == (7.3, 7.3, 2.0)  # 234 mm / 32 px, rounded to 0.1 mm for the public card


def test_labels_follow_the_patient(demo_raw, demo_store) -> None:
    """Slices of lesion patients differ from healthy ones where the lesion is (label linkage is right)."""
    train = demo_store.store.read("train")
    lesion = np.asarray(train.images[train.labels == 1])
    healthy = np.asarray(train.images[train.labels == 0])
    assert np.abs(lesion - healthy.mean(0)).max() > np.abs(healthy - healthy.mean(0)).max() * 0.8


def test_pseudonyms_and_the_split_are_keyed_per_store(demo_raw, tmp_path: Path) -> None:
    """Two stores of the same data share no pseudonym, and their secrets, not a public seed, pick who is held out
    (the held-out patients calibrate the filter and are not protected by ε: nobody may predict them)."""
    raw, _ = demo_raw
    options = ingest_options(size=16, slices=1, holdout=0.5)
    a = ingest(raw / "nifti", tmp_path / "a", labels_path=raw / "labels.csv", options=options)
    b = ingest(raw / "nifti", tmp_path / "b", labels_path=raw / "labels.csv", options=options)
    assert set(a.store.read("train").patients).isdisjoint(set(b.store.read("train").patients))
    # 8 patients per label, 4 held out: the same split twice by chance has probability 1 / 70² (1 in 4 900)
    assert train_set(a) != train_set(b)
    assert a.store.fingerprint != b.store.fingerprint
    assert "seed" not in a.report["settings"]


def test_one_patient_more_or_less_moves_at_most_one_other() -> None:
    """The split ranks patients by a keyed hash, so neighbouring cohorts differ by one patient, not hundreds."""
    from train.deidentify import Pseudonymizer, new_secret
    from train.split import split_patients

    rank = Pseudonymizer(new_secret()).split_rank
    cohort = {f"MRN{i:07d}": ("lesion" if i % 3 else "healthy") for i in range(1000)}
    before = split_patients(cohort, holdout=0.2, rank=rank)
    assert sum(v == "holdout" for v in before.values()) == 200
    for extra in (f"MRN{1000 + i:07d}" for i in range(20)):
        for label in ("healthy", "lesion"):
            after = split_patients({**cohort, extra: label}, holdout=0.2, rank=rank)
            moved = [p for p in cohort if after[p] != before[p]]
            assert len(moved) <= 1, moved
    for gone in list(cohort)[:20]:
        after = split_patients({p: lab for p, lab in cohort.items() if p != gone}, holdout=0.2, rank=rank)
        assert sum(after[p] != before[p] for p in after) <= 1
    # another secret, another split: the holdout cannot be predicted without the store's secret
    other = split_patients(cohort, holdout=0.2, rank=Pseudonymizer(new_secret()).split_rank)
    assert {p for p, s in other.items() if s == "holdout"} != {p for p, s in before.items() if s == "holdout"}


def test_bad_inputs_are_skipped_with_pseudonymous_reasons(demo_raw, tmp_path: Path) -> None:
    raw, plan = demo_raw
    inputs = tmp_path / "in"
    shutil.copytree(raw / "nifti", inputs)
    victim = plan[0].patient_id
    (inputs / f"{victim}.nii.gz").write_bytes(b"corrupt")  # corrupt file
    shutil.copy(inputs / f"{plan[1].patient_id}.nii.gz", inputs / "MRN0000001.nii.gz")  # no label for it
    (inputs / "notes.txt").write_text("ignored")
    labels = (raw / "labels.csv").read_text() + "MRN9999999,lesion,40,F\nMRN8888888,,40,F\nMRN7777777,healthy,abc,F\n"
    (tmp_path / "labels.csv").write_text(labels)

    result = ingest(
        inputs, tmp_path / "store", labels_path=tmp_path / "labels.csv", options=ingest_options(size=16, slices=2)
    )
    reasons = [s["reason"] for s in result.report["skipped"]]
    assert any("unreadable NIfTI" in r for r in reasons)
    assert any("no label" in r for r in reasons)
    assert any("empty patient_id or label" in r for r in reasons)
    assert any("age is not a number" in r for r in reasons)
    assert result.report["labelled_patients_without_usable_scan"] == 2  # MRN9999999 and the corrupt one
    blob = all_bytes(tmp_path / "store")
    for identifier in (victim, "MRN0000001", "MRN9999999", "MRN7777777", "MRN8888888"):
        assert identifier.encode() not in blob
    assert sum(result.report["patients"]["train"].values()) + sum(result.report["patients"]["holdout"].values()) == 15


def test_mixed_shapes_and_medmnist(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "pneumoniamnist.npz",
        train_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0], [1], [0], [1]]),
        val_images=rng.integers(0, 255, (4, 64, 64), dtype=np.uint8),  # a different size: resampled too
        val_labels=np.array([[0], [1], [0], [1]]),
    )
    result = ingest(
        tmp_path / "pneumoniamnist.npz",
        tmp_path / "s",
        labels_path=None,
        options=ingest_options(("0", "1"), size=32, slices=3),
    )
    store = result.store
    assert store.n_slices == 10 and store.label_names == ["0", "1"]
    assert store.read("train").images.shape[1:] == (1, 32, 32)
    # nothing says which images share a person: the unit of privacy is the image, and the store says so
    assert store.privacy_unit == "image" and result.report["privacy_unit"] == "image"


def test_a_scan_column_maps_archive_images_to_patients(tmp_path: Path) -> None:
    """Several MedMNIST images of one person: a `scan` column makes the person the unit again."""
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "organmnist.npz",
        train_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [0], [0], [1], [1], [1]]),
    )
    rows = ["scan,patient_id,label"]
    rows += [f"organmnist/train-{i:06d},{'A' if i < 3 else 'B'},{'0' if i < 3 else '1'}" for i in range(6)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = ingest(
        tmp_path / "organmnist.npz",
        tmp_path / "s",
        labels_path=tmp_path / "labels.csv",
        options=ingest_options(("0", "1"), size=16, slices=1, holdout=0.0),
    )
    assert result.store.privacy_unit == "patient"
    assert len(set(result.store.read("train").patients)) == 2 and result.store.n_slices == 6


def test_patient_ids_are_normalised(demo_raw, tmp_path: Path) -> None:
    """Case, whitespace and zero padding do not split one patient in two, nor lose their label."""
    from train.deidentify import normalise_patient_id

    assert normalise_patient_id(" MRN 000123 ") == normalise_patient_id("mrn123") == "mrn123"
    assert normalise_patient_id("p-007b") == "p-7b" and normalise_patient_id("0") == "0"
    raw, plan = demo_raw
    lines = (raw / "labels.csv").read_text().splitlines()
    messy = [lines[0]]
    for line in lines[1:]:
        patient, rest = line.split(",", 1)
        messy.append(f"  {patient.lower().replace('mrn', 'mrn00')} ,{rest}")  # other case, padding, spaces
    (tmp_path / "labels.csv").write_text("\n".join(messy) + "\n")
    result = ingest(
        raw / "nifti", tmp_path / "s", labels_path=tmp_path / "labels.csv", options=ingest_options(size=16, slices=1)
    )
    assert not result.skipped
    assert sum(sum(v.values()) for v in result.report["patients"].values()) == len(plan)


def test_the_store_publishes_a_dp_count_and_starts_its_ledger(demo_store) -> None:
    store = demo_store.store
    meta = json.loads((store.path / "store.json").read_text())
    assert (
        meta["patients_estimate"]["noise_std"] == 10.0
        and "Gaussian mechanism" in meta["patients_estimate"]["mechanism"]
    )
    assert len(store.store_id) == 32 and store.store_id not in store.fingerprint
    first = store.ledger().entries()[0]
    assert first["release"] == f"patient-count:{store.store_id}" and first["history"] == [[10.0, 1.0, 1]]
    assert stat.S_IMODE((store.path / "privacy_ledger.jsonl").stat().st_mode) == 0o600


def test_nothing_usable_is_an_error_and_leaves_no_store(demo_raw, tmp_path: Path) -> None:
    raw, _ = demo_raw
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no NIfTI"):
        ingest(tmp_path / "empty", tmp_path / "s", labels_path=raw / "labels.csv", options=ingest_options())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.nii").write_bytes(b"junk")
    with pytest.raises(InvalidInput, match="nothing usable"):
        ingest(tmp_path / "junk", tmp_path / "s", labels_path=raw / "labels.csv", options=ingest_options())
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dirs cleaned up
    with pytest.raises(InvalidInput, match="--labels"):
        ingest(raw / "nifti", tmp_path / "s", labels_path=None, options=ingest_options())


def test_existing_store_is_never_half_overwritten(demo_raw, demo_store, tmp_path: Path) -> None:
    raw, _ = demo_raw
    target = tmp_path / "store"
    shutil.copytree(demo_store.store.path, target)
    before = all_bytes(target)
    with pytest.raises(Conflict):
        ingest(raw / "nifti", target, labels_path=raw / "labels.csv", options=ingest_options(size=16, slices=1))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.nii").write_bytes(b"junk")
    with pytest.raises(InvalidInput):  # even with --force, a failed ingestion leaves the old store intact
        ingest(tmp_path / "junk", target, labels_path=raw / "labels.csv", options=ingest_options(overwrite=True))
    assert all_bytes(target) == before
    replaced = ingest(
        raw / "nifti", target, labels_path=raw / "labels.csv", options=ingest_options(size=16, slices=1, overwrite=True)
    )
    assert replaced.store.image_size == 16


def test_a_replacing_ingest_keeps_the_patients_ledger_unless_reset(demo_raw, tmp_path: Path) -> None:
    """`ingest --force` over a store its patients have spent from: the spend follows them into the new store (and
    a second DP count is composed with the first); only an explicit --reset-budget starts afresh, and says so."""
    raw, _ = demo_raw
    target = tmp_path / "store"
    options = ingest_options(size=16, slices=1)
    first = ingest(raw / "nifti", target, labels_path=raw / "labels.csv", options=options).store
    first.ledger().record("run-1", [(1.0, 0.5, 400)], status="finished", model="m")  # a released DP model
    spent = first.ledger().budget().spent
    holdout = {row.tobytes() for row in np.asarray(first.read("holdout").images)}

    again = ingest(raw / "nifti", target, labels_path=raw / "labels.csv", options=replace(options, overwrite=True))
    entries = again.store.ledger().entries()
    assert [e["release"] for e in entries[:3]] == [f"patient-count:{first.store_id}", "run-1", entries[2]["release"]]
    assert all(e["carried_from"] == first.store_id for e in entries[:2])
    assert again.store.ledger().budget().spent > spent  # the old spend plus a second count release
    # the same secret: the same patients keep their pseudonyms and their side of the split
    assert set(again.store.read("train").patients) == set(first.read("train").patients)
    assert {row.tobytes() for row in np.asarray(again.store.read("holdout").images)} == holdout

    reset = replace(options, overwrite=True, reset_budget=True)
    fresh = ingest(raw / "nifti", target, labels_path=raw / "labels.csv", options=reset).store
    entries = fresh.ledger().entries()
    assert entries[0]["status"] == "reset" and entries[0]["replaced_spent_epsilon"] >= spent
    assert [e["status"] for e in entries] == ["reset", "released"]
    assert fresh.ledger().budget().spent < spent
    with pytest.raises(InvalidInput, match="--force"):
        ingest(
            raw / "nifti", tmp_path / "new", labels_path=raw / "labels.csv", options=replace(options, reset_budget=True)
        )


def test_labels_are_declared_and_rare_labels_refused(demo_raw, tmp_path: Path) -> None:
    """The published label set is the operator's declaration; a label few patients hold is refused (it would name
    them), and patients with an undeclared label are skipped, not published."""
    raw, plan = demo_raw
    lines = (raw / "labels.csv").read_text().splitlines()
    rare = plan[0].patient_id
    lines = [
        line if not line.startswith(rare + ",") else line.replace(f",{plan[0].label},", ",glioma-x,") for line in lines
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match="declare the labels"):
        ingest(raw / "nifti", tmp_path / "s0", labels_path=tmp_path / "labels.csv", options=IngestOptions(size=16))
    declared = ingest_options(("healthy", "lesion", "glioma-x"), size=16, slices=1, min_label_patients=2)
    with pytest.raises(InvalidInput, match=r"\['glioma-x'\].*fewer than 2 patients") as refused:
        ingest(raw / "nifti", tmp_path / "s1", labels_path=tmp_path / "labels.csv", options=declared)
    assert "--declare-labels" in str(refused.value) and not (tmp_path / "s1").exists()
    with pytest.raises(InvalidInput, match="fewer than 20 patients"):  # the default k
        ingest(
            raw / "nifti",
            tmp_path / "s2",
            labels_path=raw / "labels.csv",
            options=IngestOptions(labels=("healthy", "lesion")),
        )
    result = ingest(
        raw / "nifti", tmp_path / "s3", labels_path=tmp_path / "labels.csv", options=ingest_options(size=16, slices=1)
    )
    assert result.store.label_names == ["healthy", "lesion"]  # glioma-x's patient skipped, the label unpublished
    assert [s.reason for s in result.skipped] == ["label not declared (--declare-labels)"]
    assert "glioma-x" not in json.dumps(result.report)


def test_burned_in_series_skipped_with_reason(tmp_path: Path) -> None:
    import pydicom

    plan = make_demo_cohort(tmp_path / "raw", patients=2, seed=1, dicom_fraction=1.0)
    series = tmp_path / "raw" / "dicom" / plan[0].patient_id
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(path)
    result = ingest(
        tmp_path / "raw" / "dicom",
        tmp_path / "s",
        labels_path=tmp_path / "raw" / "labels.csv",
        options=ingest_options((plan[1].label,), size=16, slices=1, holdout=0.0),
    )
    assert [s["reason"].split(":")[0] for s in result.report["skipped"]] == ["BurnedInAnnotation=YES"]
    assert result.store.n_slices == 1


def test_symlinks_are_not_followed(demo_raw, tmp_path: Path) -> None:
    raw, plan = demo_raw
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(raw / "nifti" / f"{plan[0].patient_id}.nii.gz", inputs)
    shutil.copy(raw / "nifti" / f"{plan[1].patient_id}.nii.gz", inputs)
    (inputs / "escape").symlink_to(raw / "nifti", target_is_directory=True)
    options = ingest_options(tuple({plan[0].label, plan[1].label}), size=16, slices=1, holdout=0.0)
    result = ingest(inputs, tmp_path / "s", labels_path=raw / "labels.csv", options=options)
    assert result.store.n_slices == 2


def test_parallel_workers_give_the_same_store(demo_raw, tmp_path: Path) -> None:
    raw, _ = demo_raw
    opts = {"size": 16, "slices": 2}
    one = ingest(raw, tmp_path / "one", labels_path=raw / "labels.csv", options=ingest_options(**opts, workers=1))
    two = ingest(raw, tmp_path / "two", labels_path=raw / "labels.csv", options=ingest_options(**opts, workers=2))
    every = [
        {row.tobytes() for row in np.asarray(r.store.read("train").images)}
        | {row.tobytes() for row in np.asarray(r.store.read("holdout").images)}
        for r in (one, two)
    ]
    assert every[0] == every[1]  # the same slices (each store's own secret splits them)
    assert one.report["patients"] == two.report["patients"]  # and the same counts per split and label


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        CohortStore.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InvalidInput, match="not a cohort store"):
        CohortStore.open(tmp_path / "plain")


def test_report_is_json_and_mentions_method(demo_store) -> None:
    report = json.loads((demo_store.store.path / "ingest_report.json").read_text())
    assert "HMAC" in report["deidentification"]
    assert report["settings"]["size"] == 32
    assert report["inputs"]["skipped"] == 0 and not demo_store.skipped  # the labels file inside INPUT is not a scan


def test_labels_file_errors(demo_raw, tmp_path: Path) -> None:
    raw, _ = demo_raw
    (tmp_path / "l.csv").write_text("id,diagnosis\nA,b\n")
    with pytest.raises(InvalidInput, match="patient_id,label"):
        ingest(raw / "nifti", tmp_path / "s", labels_path=tmp_path / "l.csv", options=ingest_options())
    with pytest.raises(InvalidInput, match="does not exist"):
        ingest(raw / "nifti", tmp_path / "s", labels_path=tmp_path / "missing.csv", options=ingest_options())


def test_dicom_multi_series_folder_rejected(tmp_path: Path) -> None:
    from train.demo_cohort import plan_patients

    plan = plan_patients(2, seed=0)
    write_dicom_series(tmp_path / "x", np.ones((4, 4, 2), np.int16), np.eye(4), plan[0], multiframe=False)
    write_dicom_series(tmp_path / "y", np.ones((4, 4, 2), np.int16), np.eye(4), plan[0], multiframe=False)
    for f in (tmp_path / "y").iterdir():
        f.rename(tmp_path / "x" / f"B{f.name}")
    from train.scan_io import read_dicom_series

    with pytest.raises(InvalidInput, match="several DICOM series"):
        read_dicom_series(tmp_path / "x")


def test_volumes_need_keep_faces_and_are_stored_whole(demo_raw, tmp_path: Path) -> None:
    raw, plan = demo_raw
    out = tmp_path / "store3d"
    with pytest.raises(InvalidInput, match="--keep-faces"):
        ingest(raw, out, labels_path=raw / "labels.csv", options=ingest_options(dims=3, size=16))
    assert not out.exists()

    result = ingest(raw, out, labels_path=raw / "labels.csv", options=ingest_options(dims=3, size=16, keep_faces=True))
    store = result.store
    assert store.spatial_dims == 3 and CohortStore.open(out).spatial_dims == 3
    train = store.read("train")
    assert train.images.shape[1:] == (1, 16, 16, 16)
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    # one volume per scan: every patient once, DICOM patients twice
    assert store.n_slices == len(plan) + sum(1 for p in plan if p.dicom)
    assert {row["position"] for row in store.index()} == {"0"}
    spacing = store.spacing()
    assert spacing[0] == spacing[1] == spacing[2]
    settings = result.report["settings"]
    assert settings["dims"] == 3 and settings["slices_per_scan"] is None and "keep-faces" in settings["faces"]


def test_archives_of_2d_images_are_skipped_for_volumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "tiny.npz",
        train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0], [1]]),
    )
    with pytest.raises(InvalidInput, match="2-D images"):
        ingest(
            tmp_path / "tiny.npz",
            tmp_path / "store",
            labels_path=None,
            options=ingest_options(("0", "1"), dims=3, size=16, keep_faces=True),
        )


def _public_dicom(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file(name))  # bundled with pydicom: no download


def _public_dicom_folder(root: Path) -> Path:
    """Third-party public DICOM files (pydicom's own test data: two MR slices of one patient, one uncompressed, one
    RLE-compressed), each in a folder named unlike its PatientID, plus what an export folder also holds: a text
    file, a corrupt file, a SEG object."""
    for folder, name in (("mr-a", "MR_small.dcm"), ("mr-b", "MR_small_RLE.dcm")):
        (root / folder).mkdir(parents=True)
        _public_dicom(name).save_as(root / folder / name)
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("exported by the PACS")
    (root / "notes" / "broken.dcm").write_bytes(b"\0" * 128 + b"DIC")
    seg = _public_dicom("CT_small.dcm")
    seg.Modality = "SEG"
    (root / "seg").mkdir()
    seg.save_as(root / "seg" / "seg.dcm")
    return root


def test_every_file_is_accounted_for_and_labels_link_by_folder_name(tmp_path: Path) -> None:
    raw = _public_dicom_folder(tmp_path / "raw")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nmr-a,a\nmr-b,b\nseg,a\n")
    result = ingest(
        raw, tmp_path / "store", labels_path=labels, options=ingest_options(("a", "b"), size=16, holdout=0.0)
    )
    assert result.report["inputs"] == {"found": 5, "skipped": 3}
    reasons = sorted(s.reason for s in result.skipped)
    assert reasons[:2] == ["not a readable NIfTI, DICOM or .npz file"] * 2  # the text file and the corrupt one
    assert reasons[2].startswith("not an image series (Modality SEG")
    assert result.report["patients"]["train"] == {"a": 1, "b": 1}  # linked by folder name: PatientID matched nothing
    assert result.store.n_slices == 2  # one slice each: a 1-slice series is never padded with copies
    assert result.report["modality"] == "MR"

    # PatientID names one labels row, the folder another: ambiguous, skipped with the fix; --link-by decides
    labels.write_text("patient_id,label\nmr-a,a\n4MR1,b\n")
    result = ingest(raw, tmp_path / "s2", labels_path=labels, options=ingest_options(("b",), size=16, holdout=0.0))
    assert any("--link-by patient-id or --link-by folder" in s.reason for s in result.skipped)
    assert result.report["patients"]["train"] == {"b": 1}
    chosen = ingest_options(("b",), size=16, holdout=0.0, link_by="patient-id")
    result = ingest(raw, tmp_path / "s3", labels_path=labels, options=chosen)
    assert result.report["patients"]["train"] == {"b": 1} and result.store.n_slices == 2  # both scans are 4MR1
    with pytest.raises(InvalidInput, match="--link-by"):
        ingest(raw, tmp_path / "s4", labels_path=labels, options=ingest_options(("a", "b"), link_by="guess"))


def test_projection_images_are_2d_with_their_spacing_and_modalities_do_not_mix(tmp_path: Path) -> None:
    cr = _public_dicom("CT_small.dcm")  # a 128² image turned into a radiograph: no patient geometry
    for name in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceLocation"):
        delattr(cr, name)
    cr.Modality, cr.ImagerPixelSpacing = "CR", [0.5, 0.25]  # rows 0.5 mm apart, columns 0.25 mm
    raw = tmp_path / "cr"
    (raw / "p1").mkdir(parents=True)
    cr.save_as(raw / "p1" / "cr.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\np1,a\n")
    store = ingest(
        raw,
        tmp_path / "s",
        labels_path=labels,
        options=ingest_options(("a",), size=16, holdout=0.0, allow_burned_in=True),
    ).store
    image = store.read("train").images[0, 0]
    assert store.n_slices == 1 and store.spacing()[:2] == (4.0, 4.0)  # 64 mm tall → 16 px of 4 mm
    assert (image[:, :4] == -1).all() and (image[:, -4:] == -1).all()  # 32 mm wide: centred, padded
    with pytest.raises(InvalidInput, match="2-D"):
        ingest(
            raw,
            tmp_path / "s3d",
            labels_path=labels,
            options=ingest_options(("a",), dims=3, size=16, keep_faces=True, allow_burned_in=True),
        )

    us = _public_dicom("CT_small.dcm")
    for name in ("ImageOrientationPatient", "ImagePositionPatient"):
        delattr(us, name)
    us.Modality = "US"
    (raw / "p2").mkdir()
    us.save_as(raw / "p2" / "us.dcm")
    labels.write_text("patient_id,label\np1,a\np2,b\n")
    checked = ingest_options(("a",), size=16, holdout=0.0, allow_burned_in=True)
    result = ingest(raw, tmp_path / "s2", labels_path=labels, options=checked)
    assert [s.reason for s in result.skipped] == [
        "a US image has no patient geometry; read it as a 2-D image with --allow-2d"
    ]
    with pytest.raises(InvalidInput, match="mixes DICOM modalities"):
        ingest(
            raw,
            tmp_path / "s4",
            labels_path=labels,
            options=ingest_options(("a", "b"), size=16, holdout=0.0, allow_2d=True, allow_burned_in=True),
        )


def test_legacy_multiframe_is_stacked_by_frame_order_or_skipped_with_what_is_missing(tmp_path: Path) -> None:
    """A multi-frame file without per-frame groups (pydicom's public MR slice, repeated as 5 frames with a
    different value each): stacked in frame order along the normal when its stack is defined, else refused."""
    import numpy as np

    from train.scan_io import read_dicom_series

    mr = _public_dicom("MR_small.dcm")
    frames = np.stack([np.full((mr.Rows, mr.Columns), 100 * (k + 1), dtype=np.uint16) for k in range(5)])
    mr.NumberOfFrames, mr.SpacingBetweenSlices, mr.PixelData = 5, 3.0, frames.tobytes()
    (tmp_path / "stack").mkdir()
    mr.save_as(tmp_path / "stack" / "mf.dcm")
    scan = read_dicom_series(tmp_path / "stack").scan
    assert scan.data.shape[2] == 5 and scan.spacing[2] == pytest.approx(3.0)
    assert sorted(np.unique(scan.data).tolist()) == [100.0, 200.0, 300.0, 400.0, 500.0]
    del mr.SpacingBetweenSlices, mr.SliceThickness
    mr.save_as(tmp_path / "stack" / "mf.dcm")
    with pytest.raises(InvalidInput, match="missing: SpacingBetweenSlices or SliceThickness"):
        read_dicom_series(tmp_path / "stack")


def _pydicom_data(name: str) -> Path:
    """A file of the ``pydicom-data`` package (a dev dependency: real third-party exports; never downloaded)."""
    from importlib.metadata import PackageNotFoundError, version

    from pydicom.data import get_testdata_file

    try:
        version("pydicom-data")
    except PackageNotFoundError:
        pytest.skip("pydicom-data is not installed (make install adds it): the third-party DICOM test is skipped")
    return Path(get_testdata_file(name))


def test_real_third_party_exports_are_ingested_or_skipped_with_their_reason(tmp_path: Path) -> None:
    """Public files from real devices: radiographs whose PixelSpacing is 0\\0 and an RGB ultrasound frame without
    any spacing are read as 2-D images at 1 mm per pixel (and counted as such); an oblique single coronal MR
    slice, an enhanced MR without geometry and a SEG are skipped with their reasons; a corrupt file is counted."""
    cr = tmp_path / "cr"
    for folder, name in (("rg1", "RG1_UNCR.dcm"), ("rg3", "RG3_UNCR.dcm")):
        (cr / folder).mkdir(parents=True)
        shutil.copy(_pydicom_data(name), cr / folder / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nrg1,a\nrg3,b\nus,a\nmr2,a\nemri,b\nseg,a\n")
    unknown = ingest_options(("a", "b"), size=16, holdout=0.0)
    with pytest.raises(NothingUsable) as refused:  # radiographs that do not say "no burned-in text": unknown
        ingest(cr, tmp_path / "s-cr0", labels_path=labels, options=unknown)
    assert [s.reason.split(":")[0] for s in refused.value.skipped] == ["BurnedInAnnotation unknown"] * 2
    checked = replace(unknown, allow_burned_in=True)  # the operator looked at the pixels
    result = ingest(cr, tmp_path / "s-cr", labels_path=labels, options=checked)
    assert result.report["modality"] == "CR" and result.report["images_without_pixel_spacing"] == 2
    side_mm = np.median([1955, 1760]) / 16  # 1 mm per pixel: the longer side over 16 px, median of the two
    assert result.store.n_slices == 2 and result.store.spacing()[:2] == pytest.approx((side_mm, side_mm), abs=0.06)
    assert result.skipped == []

    us = tmp_path / "us"
    (us / "us").mkdir(parents=True)
    shutil.copy(_pydicom_data("US1_UNCR.dcm"), us / "us" / "us.dcm")
    result = ingest(
        us,
        tmp_path / "s-us",
        labels_path=labels,
        options=ingest_options(("a",), size=16, holdout=0.0, allow_2d=True, allow_burned_in=True),
    )
    assert result.report["modality"] == "US" and result.store.n_slices == 1
    assert result.report["images_without_pixel_spacing"] == 1

    mr = tmp_path / "mr"
    for folder, name in (("mr2", "MR2_UNCR.dcm"), ("emri", "emri_small.dcm"), ("seg", "liver.dcm")):
        (mr / folder).mkdir(parents=True)
        shutil.copy(_pydicom_data(name), mr / folder / name)
    (mr / "notes").mkdir()
    (mr / "notes" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    with pytest.raises(NothingUsable) as refused:  # nothing usable: the error still accounts for every file
        ingest(mr, tmp_path / "s-mr", labels_path=labels, options=ingest_options(("a", "b"), size=16, holdout=0.0))
    reasons = sorted(s.reason for s in refused.value.skipped)
    assert len(reasons) == 4
    assert reasons[0] == "a DICOM file with neither pixels nor a Modality (corrupt, or not an image)"
    assert reasons[1].startswith("a single sagittal or coronal slice holds no axial slice")
    assert reasons[2].startswith("multi-frame DICOM without per-frame geometry")
    assert reasons[3].startswith("not an image series (Modality SEG")
    assert not (tmp_path / "s-mr").exists()
