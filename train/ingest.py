"""Ingestion: scans + labels → de-identified, patient-split cohort store.

Which patient a scan belongs to:
- NIfTI (``.nii``/``.nii.gz``): the file name without its suffix is the patient id;
- DICOM: a folder holding the files of one series; the ``PatientID`` tag is the patient id (the folder
  name when the tag is empty);
- MedMNIST ``.npz``: every image is its own patient, id ``<archive stem>/<split>-<index>``, labelled by
  the archive's integer label unless the labels file names that id.

Real ids only ever live in memory: they are turned into keyed pseudonyms before anything is written,
and the report refers to skipped inputs by pseudonymous references, never by path.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from generators.errors import InvalidInput, SynthCohortError
from train.deidentify import Pseudonymizer, clean_age, clean_sex, new_secret
from train.preprocess import Slab, axial_slices
from train.scan_io import (
    is_dicom_file,
    is_nifti,
    nifti_stem,
    read_dicom_series,
    read_medmnist,
    read_nifti,
    scan_from_display,
)
from train.split import split_patients
from train.store import CohortStore, SliceRecord, StoreWriter

LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
LABEL_RULE = "label names must be 1-64 letters, digits, '_', '.', '+' or '-' and start with a letter or digit"


@dataclass(frozen=True)
class IngestOptions:
    """Knobs of one ingestion run (CLI flags)."""

    size: int = 64
    slices: int = 8
    holdout: float = 0.2
    seed: int = 0
    allow_burned_in: bool = False
    workers: int = 1
    overwrite: bool = False


@dataclass(frozen=True)
class InputItem:
    """One thing to read: a NIfTI file, a DICOM series folder, or a MedMNIST archive."""

    kind: str  # "nifti" | "dicom" | "npz"
    path: Path


@dataclass
class PatientLabel:
    label: str
    age: int | None = None
    sex: str = "U"


@dataclass
class Skipped:
    """A skipped input; ``ref`` is pseudonymous, ``path`` is shown only on request and never stored."""

    ref: str
    kind: str
    reason: str
    path: str = field(default="", compare=False)

    def public(self) -> dict[str, str]:
        return {"ref": self.ref, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class LoadedScan:
    patient_id: str
    slab: Slab
    npz_label: int | None = None


class NothingUsable(InvalidInput):
    """Every input was skipped; ``skipped`` says why (paths included, for the operator's terminal only)."""

    def __init__(self, message: str, skipped: list[Skipped]) -> None:
        super().__init__(message)
        self.skipped = skipped


@dataclass
class IngestResult:
    store: CohortStore
    report: dict
    skipped: list[Skipped]


# ------------------------------------------------------------------------------------------- labels
def read_labels(path: Path, pseudo: Pseudonymizer) -> tuple[dict[str, PatientLabel], list[Skipped]]:
    """Parse ``patient_id,label[,age,sex]``; bad rows are skipped with a reason (by row number)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "patient_id" not in columns or "label" not in columns:
                raise InvalidInput(f"labels file must have columns patient_id,label[,age,sex]; found {columns}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"cannot read labels file {path.name}: {type(exc).__name__}") from None

    labels: dict[str, PatientLabel] = {}
    skipped: list[Skipped] = []
    conflicting: set[str] = set()
    for number, row in enumerate(rows, start=2):
        ref = pseudo.reference(f"labels-row-{number}")
        patient, label = row.get("patient_id", ""), row.get("label", "")
        if not patient or not label:
            skipped.append(Skipped(ref, "label-row", f"row {number}: empty patient_id or label"))
            continue
        try:
            age = clean_age(row["age"]) if row.get("age") else None
            sex = clean_sex(row.get("sex", ""))
        except InvalidInput as exc:
            skipped.append(Skipped(ref, "label-row", f"row {number}: {exc}"))
            continue
        if not LABEL_PATTERN.fullmatch(label):
            skipped.append(Skipped(ref, "label-row", f"row {number}: {LABEL_RULE}"))
            continue
        entry = PatientLabel(label=label, age=age, sex=sex)
        if patient in labels and labels[patient].label != label:
            conflicting.add(patient)
        labels[patient] = entry
    for patient in sorted(conflicting):
        del labels[patient]
        skipped.append(Skipped(pseudo.patient(patient), "label-row", "patient has conflicting labels"))
    return labels, skipped


# ---------------------------------------------------------------------------------------- discovery
def discover(root: Path, *, exclude: set[Path] | None = None) -> Iterator[InputItem]:
    """Yield input items under ``root`` in a stable order. Symbolic links are not followed."""
    exclude = {p.resolve() for p in exclude or set()}
    if root.is_file():
        if root.suffix.lower() == ".npz":
            yield InputItem("npz", root)
        elif is_nifti(root):
            yield InputItem("nifti", root)
        else:
            raise InvalidInput(f"{root.name} is not a NIfTI, .npz or a directory of scans")
        return
    if not root.is_dir():
        raise InvalidInput(f"input {root} does not exist")
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder)
        has_dicom = False
        for name in sorted(files):
            path = base / name
            if name.startswith(".") or path.is_symlink() or path.resolve() in exclude:
                continue
            if is_nifti(path):
                yield InputItem("nifti", path)
            elif name.lower().endswith(".npz"):
                yield InputItem("npz", path)
            elif not has_dicom and is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            yield InputItem("dicom", base)


# ------------------------------------------------------------------------------------------ loading
def load_item(item: InputItem, *, size: int, slices: int, allow_burned_in: bool) -> LoadedScan:
    """Read one NIfTI or DICOM item into slices (runs in worker processes)."""
    if item.kind == "nifti":
        scan, patient = read_nifti(item.path), nifti_stem(item.path)
    elif item.kind == "dicom":
        series = read_dicom_series(item.path, allow_burned_in=allow_burned_in)
        scan, patient = series.scan, series.patient_id.strip() or item.path.name
    else:
        raise InvalidInput(f"unsupported input kind {item.kind}")
    return LoadedScan(patient_id=patient, slab=axial_slices(scan, n_slices=slices, size=size))


def _load_safely(args: tuple[InputItem, int, int, bool]) -> LoadedScan | str:
    item, size, slices, allow_burned_in = args
    try:
        return load_item(item, size=size, slices=slices, allow_burned_in=allow_burned_in)
    except SynthCohortError as exc:
        return str(exc)
    except Exception as exc:  # a reader bug must not abort a 10 000-file ingestion
        return f"unexpected {type(exc).__name__} while reading"


def _load_npz(item: InputItem, size: int, slices: int) -> Iterator[LoadedScan | tuple[str, str]]:
    for image in read_medmnist(item.path):
        key = f"{item.path.stem}/{image.key}"
        try:
            slab = axial_slices(scan_from_display(image.pixels), n_slices=slices, size=size)
        except SynthCohortError as exc:
            yield key, str(exc)
            continue
        yield LoadedScan(patient_id=key, slab=slab, npz_label=image.label)


# --------------------------------------------------------------------------------------- the driver
def ingest(
    input_path: Path,
    out: Path,
    *,
    labels_path: Path | None,
    options: IngestOptions,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> IngestResult:
    """Read every scan under ``input_path``, de-identify, split by patient and write the store at ``out``."""
    if options.size < 8 or options.size > 1024:
        raise InvalidInput(f"--size must be between 8 and 1024, got {options.size}")
    if options.slices < 1:
        raise InvalidInput(f"--slices must be at least 1, got {options.slices}")
    if not 0.0 <= options.holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1), got {options.holdout}")
    secret = new_secret()
    pseudo = Pseudonymizer(secret)
    labels: dict[str, PatientLabel] = {}
    skipped: list[Skipped] = []
    if labels_path is not None:
        if not labels_path.is_file():
            raise InvalidInput(f"labels file {labels_path} does not exist")
        labels, skipped = read_labels(labels_path, pseudo)

    items = list(discover(input_path, exclude={labels_path} if labels_path else None))
    if not items:
        raise InvalidInput(f"no NIfTI, DICOM or .npz inputs found under {input_path}")
    if labels_path is None and any(i.kind != "npz" for i in items):
        raise InvalidInput("--labels is required for NIfTI and DICOM inputs")
    if on_total:
        on_total(len(items))

    def reference(item: InputItem) -> str:
        return pseudo.reference(str(item.path.relative_to(input_path) if input_path.is_dir() else item.path.name))

    with StoreWriter(out, size=options.size, overwrite=options.overwrite) as writer:
        scans_of: Counter[str] = Counter()
        patient_info: dict[str, PatientLabel] = {}
        real_of: dict[str, str] = {}  # in memory only: lets the seed, not the secret, decide the split
        seen_real: set[str] = set()
        pending: list[tuple[str, int, Slab]] = []  # (pseudonym, scan number, slab) before the split

        def accept(loaded: LoadedScan, item: InputItem, ref: str) -> None:
            info = labels.get(loaded.patient_id)
            if info is None and loaded.npz_label is not None:
                info = PatientLabel(label=str(loaded.npz_label))
            if info is None:
                skipped.append(Skipped(ref, item.kind, "no label for this patient in the labels file", str(item.path)))
                return
            pseudonym = pseudo.patient(loaded.patient_id)
            real_of[pseudonym] = loaded.patient_id
            patient_info[pseudonym] = info
            scans_of[pseudonym] += 1
            pending.append((pseudonym, scans_of[pseudonym] - 1, loaded.slab))
            seen_real.add(loaded.patient_id)

        scan_items = [i for i in items if i.kind != "npz"]
        jobs = [(i, options.size, options.slices, options.allow_burned_in) for i in scan_items]
        if options.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=options.workers) as pool:
                results = pool.map(_load_safely, jobs, chunksize=4)
                for item, result in zip(scan_items, results, strict=True):
                    _handle(result, item, reference(item), accept, skipped)
                    if progress:
                        progress(1)
        else:
            for item, job in zip(scan_items, jobs, strict=True):
                _handle(_load_safely(job), item, reference(item), accept, skipped)
                if progress:
                    progress(1)
        for item in (i for i in items if i.kind == "npz"):
            try:
                for result in _load_npz(item, options.size, options.slices):
                    if isinstance(result, tuple):
                        skipped.append(Skipped(pseudo.reference(result[0]), "npz", result[1]))
                    else:
                        accept(result, item, pseudo.reference(result.patient_id))
            except SynthCohortError as exc:
                skipped.append(Skipped(reference(item), "npz", str(exc), str(item.path)))
            if progress:
                progress(1)

        if not pending:
            raise NothingUsable(
                f"nothing usable: {len(items)} inputs found, all skipped "
                f"({_summarise(skipped)}); run with --show-paths to see which",
                skipped,
            )
        split_real = split_patients(
            {real_of[p]: i.label for p, i in patient_info.items()}, holdout=options.holdout, seed=options.seed
        )
        split_of = {p: split_real[real_of[p]] for p in patient_info}
        for pseudonym, scan_no, slab in pending:
            info = patient_info[pseudonym]
            records = [
                SliceRecord(
                    patient=pseudonym,
                    split=split_of[pseudonym],
                    label=info.label,
                    age=info.age,
                    sex=info.sex,
                    scan=scan_no,
                    position=int(position),
                    spacing_row=round(slab.spacing[0], 4),
                    spacing_col=round(slab.spacing[1], 4),
                    spacing_slice=round(slab.spacing[2], 4),
                )
                for position in slab.positions
            ]
            writer.add(slab.images, records)

        slices_of: Counter[str] = Counter()
        for pseudonym, _, slab in pending:
            slices_of[pseudonym] += len(slab.positions)
        unlabelled_scanless = sorted(set(labels) - seen_real)
        report = _report(
            options=options,
            n_inputs=len(items),
            patient_info=patient_info,
            split_of=split_of,
            slices_of=slices_of,
            multi_scan=sum(1 for n in scans_of.values() if n > 1),
            labelled_without_scan=len(unlabelled_scanless),
            skipped=skipped,
        )
        label_names = sorted({i.label for i in patient_info.values()})
        store = writer.commit(label_names=label_names, report=report, secret=secret)
    return IngestResult(store=store, report=report, skipped=skipped)


def _handle(
    result: LoadedScan | str,
    item: InputItem,
    ref: str,
    accept: Callable[[LoadedScan, InputItem, str], None],
    skipped: list[Skipped],
) -> None:
    if isinstance(result, str):
        skipped.append(Skipped(ref, item.kind, result, str(item.path)))
    else:
        accept(result, item, ref)


def _summarise(skipped: list[Skipped]) -> str:
    counts = Counter(s.reason.split(":")[0].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "none"


def _report(
    *,
    options: IngestOptions,
    n_inputs: int,
    patient_info: dict[str, PatientLabel],
    split_of: dict[str, str],
    slices_of: Counter[str],
    multi_scan: int,
    labelled_without_scan: int,
    skipped: list[Skipped],
) -> dict:
    patients: dict[str, Counter[str]] = defaultdict(Counter)
    slices: dict[str, Counter[str]] = defaultdict(Counter)
    for pseudonym, info in patient_info.items():
        patients[split_of[pseudonym]][info.label] += 1
        slices[split_of[pseudonym]][info.label] += slices_of[pseudonym]
    return {
        "settings": {
            "size": options.size,
            "slices_per_scan": options.slices,
            "axis": "axial",
            "holdout": options.holdout,
            "seed": options.seed,
            "allow_burned_in": options.allow_burned_in,
        },
        "inputs": {"found": n_inputs, "skipped": sum(1 for s in skipped if s.kind != "label-row")},
        "patients": {split: dict(sorted(c.items())) for split, c in sorted(patients.items())},
        "slices": {split: dict(sorted(c.items())) for split, c in sorted(slices.items())},
        "patients_with_multiple_scans": multi_scan,
        "labelled_patients_without_usable_scan": labelled_without_scan,
        "skipped": [s.public() for s in skipped],
        "skipped_summary": _summarise(skipped),
        "deidentification": (
            "Only pixels and voxel geometry were kept; every header field was dropped. Patient ids are "
            "HMAC-SHA256 pseudonyms keyed with this store's secret; ages over 89 are reported as 90; "
            "skipped inputs are listed by pseudonymous reference, not by path."
        ),
    }
