"""The cohort pipeline and bulk export: counts, files, provenance, resume after kill -9, Ray, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.pipeline import (
    CohortProgress,
    CohortRequest,
    MemorizationSuspected,
    build_cohort,
    draw_rounds,
    load_seed_key,
    local_runner,
    sample_seed,
)
from generators.diffusion_2d import DiffusionModel
from generators.errors import Conflict, InvalidInput, NotFound, PrivacyPolicy


def export_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "export", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_export_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    proc = export_cli(
        str(tiny_model),
        "--out",
        str(out),
        "--count",
        "healthy=5",
        "--count",
        "lesion=3",
        "--format",
        "nifti,png,npz,dicom",
        "--shard-size",
        "4",
        "--seed",
        "11",
    )
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "8 samples" in stdout and "ε =" in stdout
    manifest = read_manifest(out)
    samples = manifest["samples"]
    assert [s["label"] for s in samples].count("healthy") == 5 and [s["label"] for s in samples].count("lesion") == 3
    assert all(set(s) == {"file", "label", "index", "seed", "model_id", "dicom"} for s in samples)  # nothing more
    assert len({s["seed"] for s in samples}) == 8
    card = json.loads((tiny_model / "model_card.json").read_text())
    for s in samples:
        image = nib.load(out / s["file"])
        assert image.shape == (16, 16, 1)
        np.testing.assert_allclose(image.header.get_zooms(), card["voxel_spacing_mm"], rtol=1e-5)
        assert (out / s["file"].replace("images/", "previews/").replace(".nii.gz", ".png")).is_file()
        assert [p.name for p in (out / s["dicom"]).iterdir()] == ["0001.dcm"]  # a slice: one DICOM instance
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "manifest.csv", "datalist.json", "privacy_report.json", "README.md", "cohort.npz"} <= names
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temp files or shard records left
    csv_rows = (out / "manifest.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "file,label,index,seed,model_id,dicom" and len(csv_rows) == 9
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) == 8 and {d["label"] for d in datalist["training"]} <= {0, 1}
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["private"] and report["differential_privacy"]["epsilon"] == card["epsilon"]
    assert report["differential_privacy"]["privacy_unit"] == "patient"
    assert report["memorization_filter"]["covered_by_epsilon"] is False
    assert "NOT part of the differential-privacy guarantee" in report["memorization_filter"]["statement"]
    assert report["counts"] == {"samples": 8, "per_label": {"healthy": 5, "lesion": 3}}
    assert "not protected by epsilon" in report["what_holds"]
    assert "threshold" not in report["memorization_filter"]  # nothing in embedding units leaves the server
    readme = (out / "README.md").read_text()
    assert "synthetic" in readme and "ε" in readme
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"private/" not in everything and str(tiny_model).encode() not in everything

    # provenance: a manifest seed regenerates the same pixels
    model = DiffusionModel.load(tiny_model, device="cpu")
    first = samples[0]
    again = model.generate(labels=[first["label"]], seed=0, seeds=[first["seed"]])
    stored = np.asarray(nib.load(out / first["file"]).dataobj)[:, :, 0]
    np.testing.assert_allclose(stored, again.images[0, 0].numpy()[::-1, :].T, atol=1e-5)
    key = load_seed_key(tiny_model)  # the operator holds the key and can tell which attempt a seed was
    attempts = range(5)
    assert first["seed"] in {sample_seed(key, 11, first["label"], first["index"], a) for a in attempts}


def test_same_dataset_whatever_the_worker_count(tiny_model: Path, tmp_path: Path) -> None:
    request = CohortRequest(counts={"healthy": 4, "lesion": 4}, seed=3, shard_size=2)
    one = build_cohort(tiny_model, request, tmp_path / "one", device="cpu")
    two = build_cohort(tiny_model, request, tmp_path / "two", runner=local_runner(tiny_model, 2, "cpu"), device="cpu")
    assert one["samples"] == two["samples"]


def test_ray_backend_matches_local(tiny_model: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from app.ray_backend import ray_runner

    request = CohortRequest(counts={"healthy": 3, "lesion": 2}, seed=5, shard_size=2)
    local = build_cohort(tiny_model, request, tmp_path / "local", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = build_cohort(
            tiny_model, request, tmp_path / "ray", runner=ray_runner(tiny_model, 2, "cpu"), device="cpu"
        )
    finally:
        ray.shutdown()
    assert remote["samples"] == local["samples"]


def test_resume_after_kill_9(tiny_model: Path, tmp_path: Path) -> None:
    args = ["--count", "healthy=16", "--count", "lesion=16", "--shard-size", "2", "--seed", "9"]
    request = CohortRequest(counts={"healthy": 16, "lesion": 16}, seed=9, shard_size=2)  # the same, uninterrupted
    build_cohort(tiny_model, request, tmp_path / "straight", device="cpu")

    out = tmp_path / "killed"
    partial = tmp_path / ".killed.partial"
    victim = export_cli(str(tiny_model), "--out", str(out), *args)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((partial / ".shards").glob("*.json"))) < 3:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()  # no half dataset is visible
    done_before = len(list((partial / ".shards").glob("*.json")))
    assert 3 <= done_before < 16

    refused = export_cli(str(tiny_model), "--out", str(out), *args)
    assert refused.wait(timeout=300) == 4 and "--resume" in refused.stderr.read()
    resumed = export_cli(str(tiny_model), "--out", str(out), *args, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert not partial.exists()
    assert read_manifest(out)["samples"] == read_manifest(tmp_path / "straight")["samples"]
    files = sorted(p.relative_to(out) for p in (out / "images").rglob("*.nii.gz"))
    assert len(files) == 32


def test_bad_requests(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="valid labels are"):
        build_cohort(tiny_model, CohortRequest(counts={"tumour": 2}), tmp_path / "a", device="cpu")
    with pytest.raises(InvalidInput, match="positive integer"):
        build_cohort(tiny_model, CohortRequest(counts={"healthy": 0}), tmp_path / "a", device="cpu")
    with pytest.raises(InvalidInput, match="at most"):
        build_cohort(tiny_model, CohortRequest(counts={"healthy": 10**7}), tmp_path / "a", device="cpu")
    with pytest.raises(InvalidInput, match="format"):
        build_cohort(tiny_model, CohortRequest(counts={"healthy": 1}, formats=("dicom",)), tmp_path / "a", device="cpu")
    (tmp_path / "exists").mkdir()
    with pytest.raises(Conflict, match="already exists"):
        build_cohort(tiny_model, CohortRequest(counts={"healthy": 1}), tmp_path / "exists", device="cpu")
    (tmp_path / ".unfinished.partial").mkdir()
    with pytest.raises(Conflict, match="pass --resume"):
        build_cohort(tiny_model, CohortRequest(counts={"healthy": 1}), tmp_path / "unfinished", device="cpu")
    assert not (tmp_path / "a").exists()

    for args, code, message in (
        (["--count", "tumour=2"], 2, "valid labels are"),
        (["--count", "healthy=-3"], 2, "positive integer"),
        (["--n", "2", "--count", "healthy=1"], 2, "either --n"),
        (["--count", "healthy"], 2, "LABEL=N"),
    ):
        proc = export_cli(str(tiny_model), "--out", str(tmp_path / "cli"), *args)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == code and message in stderr, stderr
    # refused from the card and the disk alone: the model's libraries (torch, diffusers, the filter) are never imported
    lines = ["import sys", "from app.cli import main", "try:", "    main()", "finally:"]
    probe = "\n".join([*lines, "    print(sorted({'torch', 'diffusers', 'faiss'} & set(sys.modules)))"])
    for out, flags, code, message in (
        ("cli", ["--count", "tumour=2"], 2, "valid labels are"),
        ("exists", ["--n", "1"], 4, "already exists"),
        ("unfinished", ["--n", "1"], 4, "pass --resume"),
    ):
        argv = ["export", str(tiny_model), "--out", str(tmp_path / out), *flags]
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == code and message in done.stderr and done.stdout.strip() == "[]", done
    assert not (tmp_path / "cli").exists() and not (tmp_path / "unfinished").exists()


def test_missing_filter_and_not_private_models(tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("private"))
    with pytest.raises(NotFound, match="calibrate"):
        build_cohort(bare, CohortRequest(counts={"healthy": 1}), tmp_path / "x", device="cpu")

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    card = json.loads((plain / "model_card.json").read_text())
    card.update(dp=False, epsilon=None, statement="NOT PRIVATE: this model was trained without differential privacy.")
    (plain / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(PrivacyPolicy, match="WITHOUT differential privacy"):
        build_cohort(plain, CohortRequest(counts={"healthy": 1}), tmp_path / "x", device="cpu")
    proc = export_cli(str(plain), "--out", str(tmp_path / "x"), "--n", "1")
    assert proc.wait(timeout=300) == 5
    build_cohort(plain, CohortRequest(counts={"healthy": 2}, allow_not_private=True), tmp_path / "np", device="cpu")
    report = json.loads((tmp_path / "np" / "privacy_report.json").read_text())
    assert report["private"] is False and "NOT PRIVATE" in report["warning"]
    assert "NOT PRIVATE" in (tmp_path / "np" / "README.md").read_text()


def test_memorizing_model_stops_with_a_finding(tiny_model: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict"
    shutil.copytree(tiny_model, strict)
    meta_path = strict / "private" / "filter" / "filter.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = 1e9  # every output now counts as "closer than unseen patients"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MemorizationSuspected, match="appears to memorize"):
        build_cohort(strict, CohortRequest(counts={"healthy": 30}, shard_size=30), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()  # nothing kept at all


def test_cli_n_per_label_with_worker_processes(tiny_model: Path, tmp_path: Path) -> None:
    proc = export_cli(str(tiny_model), "--out", str(tmp_path / "c"), "--n", "2", "--workers", "2", "--shard-size", "1")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert [s["label"] for s in read_manifest(tmp_path / "c")["samples"]] == ["healthy", "healthy", "lesion", "lesion"]


def _published_numbers(dataset: Path) -> dict[str, list]:
    """Every per-sample number a holder of the released dataset can read, by field name."""
    manifest = read_manifest(dataset)
    numbers: dict[str, list] = {}
    for sample in manifest["samples"]:
        for name, value in sample.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                numbers.setdefault(name, []).append(value)
    return numbers


def _distances(model_dir: Path, request_seed: int, label: str, indices: Iterable[int], attempt: int) -> np.ndarray:
    """The filter's distance of each sample's draw number ``attempt`` (what the export compares to its threshold)."""
    from privacy_filters import MemorizationFilter

    key = load_seed_key(model_dir)
    seeds = [sample_seed(key, request_seed, label, i, attempt) for i in indices]
    images = DiffusionModel.load(model_dir, device="cpu").generate(labels=[label] * len(seeds), seed=0, seeds=seeds)
    return MemorizationFilter.load(model_dir / "private" / "filter").distances(images.images)


def _with_threshold(tiny_model: Path, out: Path, threshold: float) -> Path:
    """A copy of the tiny model whose filter rejects every draw at a distance of ``threshold`` or less."""
    shutil.copytree(tiny_model, out)
    meta_path = out / "private" / "filter" / "filter.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = float(threshold)
    meta_path.write_text(json.dumps(meta))
    return out


def _rejecting_one_first_draw(tiny_model: Path, request: CohortRequest) -> float:
    """A threshold under which exactly one first draw of ``request`` is rejected — its sample's, whose first draw
    lies nearest the training data — and that sample's next draws are not all rejected, so the export succeeds
    after a redraw. Chosen from the draws themselves, so it holds whatever DP noise the tiny model was trained with
    (a fixed quantile of other draws does not: a shard's few draws can all fall under it)."""
    first = {
        (label, i): d
        for label, n in request.counts.items()
        for i, d in enumerate(_distances(tiny_model, request.seed, label, range(n), attempt=0))
    }
    (label, index), nearest = min(first.items(), key=lambda item: item[1])
    runner_up = sorted(first.values())[1]
    later = [_distances(tiny_model, request.seed, label, [index], attempt)[0] for attempt in (1, 2, 3)]
    return (nearest + min(runner_up, max(later))) / 2


def test_a_released_dataset_is_no_membership_oracle(tiny_model: Path, tmp_path: Path) -> None:
    """The review's attacks, on a real export whose filter rejects 6 of its 40 first draws.

    The first attack: with the public embedding, a per-sample `filter_score = d(sample, nearest training) /
    threshold` gives the threshold (d / score, the same for every sample), and then each score says how close some
    training slice sits to the sample: a candidate's slice at exactly that distance is a member. It needs a
    per-sample number computed from training data (a score, distance or attempt count) or seeds that show which
    draws were rejected. The second reads the regenerated samples off the files themselves: a sample redrawn after
    a rejection used to be written one generation round later (its mtime, its DICOM times, its place in the
    write order). The released dataset must offer none of these.
    """
    import hashlib

    first = _distances(tiny_model, 5, "healthy", range(40), attempt=0)
    strict = _with_threshold(tiny_model, tmp_path / "strict", np.quantile(first, 0.15))  # 6 first draws rejected
    totals: dict = {}
    out = tmp_path / "released"
    build_cohort(
        strict,
        CohortRequest(
            counts={"healthy": 40}, seed=5, shard_size=8, spare_fraction=1.0, formats=("nifti", "png", "dicom")
        ),
        out,
        device="cpu",
        progress=lambda state: totals.update(generated=state.generated, rejected=state.rejected),
    )
    assert totals["rejected"] >= 4  # regenerations did happen (the operator sees how many) ...

    # ... and the dataset has no per-sample number but its index and seed: nothing to solve a threshold from
    numbers = _published_numbers(out)
    assert set(numbers) == {"index", "seed"}
    assert sorted(numbers["index"]) == list(range(40))
    # the seeds do not say which samples were regenerated: without the key no attempt's seed can be recomputed
    samples = read_manifest(out)["samples"]
    public_guess = {
        int(hashlib.sha256(f"5:healthy:{s['index']}:{a}".encode()).hexdigest()[:15], 16)
        for s in samples
        for a in range(5)
    }
    assert not public_guess & {s["seed"] for s in samples}
    key = load_seed_key(strict)
    regenerated = [s for s in samples if s["seed"] != sample_seed(key, 5, "healthy", s["index"], 0)]
    assert len(regenerated) >= 4  # the operator, holding the key, can tell them apart; the public cannot
    assert all(set(s) == set(samples[0]) for s in regenerated)
    # no field of the dataset's documents is a filter total, score, distance, threshold or exact private count
    fields = set((out / "manifest.csv").read_text().splitlines()[0].split(","))
    for name in ("manifest.json", "privacy_report.json", "datalist.json"):
        fields |= _keys(json.loads((out / name).read_text()))
    for word in ("rejected", "generated", "attempt", "score", "distance", "threshold", "n_train", "n_holdout"):
        assert not [f for f in fields if word in f.lower() and not f.startswith("max_")], word  # max_*: the request

    # nothing in time or order either: one mtime for every file and folder, the manifest in index order, and no
    # header, tag or chunk of a regenerated sample's files differs from a first-try sample's, but its pixels
    assert {p.stat().st_mtime for p in [out, *out.rglob("*")]} == {release_time_of(out)}
    assert [s["index"] for s in samples] == list(range(40))
    assert len({_file_headers(out, s) for s in samples}) == 1


def release_time_of(dataset: Path) -> float:
    from datetime import datetime

    return datetime.fromisoformat(read_manifest(dataset)["dataset"]["request"]["released_at"]).timestamp()


def _file_headers(dataset: Path, sample: dict) -> str:
    """Everything in a sample's NIfTI, PNG and DICOM files but its pixels, its own name and its random UIDs."""
    import gzip

    import pydicom

    nifti = dataset / sample["file"]
    raw = nifti.read_bytes()
    parts = [raw[:10].hex(), nib.load(nifti).header.binaryblock.hex(), gzip.decompress(raw)[348:352].hex()]
    png = (dataset / sample["file"].replace("images/", "previews/").replace(".nii.gz", ".png")).read_bytes()
    offset, chunks = 8, []
    while offset < len(png):  # every chunk but the pixels (IDAT), so a tIME chunk or text would show
        length, kind = int.from_bytes(png[offset : offset + 4], "big"), png[offset + 4 : offset + 8]
        chunks.append(kind.decode() + ("" if kind == b"IDAT" else png[offset + 8 : offset + 8 + length].hex()))
        offset += 12 + length
    parts.append(",".join(sorted(set(chunks))))
    for path in sorted((dataset / sample["dicom"]).iterdir()):
        ds = pydicom.dcmread(path)
        name = sample["file"].rsplit("/", 1)[1].removesuffix(".nii.gz")
        random_uid = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"}
        random_uid |= {"MediaStorageSOPInstanceUID", "FileMetaInformationGroupLength"}  # follows the UIDs' lengths
        for element in [*ds.file_meta.iterall(), *ds.iterall()]:
            if element.keyword == "PixelData" or element.keyword in random_uid:
                continue
            parts.append(f"{element.keyword}={str(element.value).replace(name, '<name>')}")
    return "\n".join(parts)


def test_a_shard_does_the_same_work_whatever_the_filter_decides(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How long a job takes must not say how many draws were rejected: every shard generates and filters the same
    batches (first draws, then its fixed spare rounds) whether the filter accepts everything, rejects a draw,
    or rejects everything — and a failing export still runs every shard before it reports the finding."""
    calls: list[int] = []
    real_generate = DiffusionModel.generate

    def counted(self, *args, **kwargs):  # the real sampler, counted
        calls.append(len(kwargs["seeds"]))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModel, "generate", counted)
    request = CohortRequest(counts={"healthy": 10, "lesion": 3}, seed=5, shard_size=6)
    work = {}
    rejected, totals = {}, {}

    def count_rejected(state: CohortProgress) -> None:
        totals["n"] = state.rejected

    for name, threshold in (("open", 1e-12), ("some", _rejecting_one_first_draw(tiny_model, request))):
        model = _with_threshold(tiny_model, tmp_path / name, threshold)
        calls.clear()
        build_cohort(model, request, tmp_path / f"{name}-out", device="cpu", progress=count_rejected)
        work[name], rejected[name] = list(calls), totals["n"]
    assert rejected["open"] == 0 < rejected["some"]  # the filter decided differently, and both exports succeeded
    closed = _with_threshold(tiny_model, tmp_path / "closed", 1e9)
    calls.clear()
    with pytest.raises(MemorizationSuspected) as finding:
        build_cohort(closed, request, tmp_path / "closed-out", device="cpu")
    work["closed"] = list(calls)
    plan = [size for n in (6, 4, 3) for size in draw_rounds(n)]  # healthy 6 + 4, lesion 3
    assert work["open"] == work["some"] == work["closed"] == plan == [6, 4, 4, 4, 4, 4, 3, 4, 4]
    assert "healthy-00000" in finding.value.detail and "lesion-00000" in finding.value.detail  # every shard ran
    assert finding.value.public_message == "the job could not be completed; the operator has been told"
    assert not (tmp_path / "closed-out").exists()


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()
