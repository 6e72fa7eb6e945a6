"""Ingestion: scans + labels → de-identified, patient-split cohort store.

Which patient a scan belongs to:
- an optional ``scan`` column in the labels file maps a scan to the row's ``patient_id`` explicitly; a scan
  is named by its NIfTI file name without suffix, its DICOM folder (path relative to the input), or
  ``<archive stem>/<split>-<index>`` for an image of a MedMNIST archive;
- otherwise NIfTI: the file name without its suffix is the patient id; DICOM: a folder holding the files of
  one series, linked by ``--link-by`` (``auto``: the ``PatientID`` tag, then the folder name; two different
  matching rows are ambiguous and the series is skipped with the fix);
- MedMNIST ``.npz`` images that no ``scan`` row maps to a patient are each their own unit, labelled by the
  archive's integer label unless the labels file names that id. Such a store cannot tell patients apart,
  so its privacy unit is the **image** (``store.privacy_unit``), and model cards say so.

Patient ids are compared after :func:`train.deidentify.normalise_patient_id` (case, whitespace, zero
padding), so ``P007`` in the labels file and ``p7.nii.gz`` are one patient.

What is stored of each scan: ``--dims 2`` (default) keeps ``--slices`` axial slices around its centre;
``--dims 3`` keeps the whole volume on an isotropic ``--size``³ grid (RAS orientation, see
:mod:`train.preprocess`). A head volume carries the patient's face, so ``--dims 3`` needs ``--deface`` (the
face is removed before anything else, :mod:`train.deface`; a scan that cannot be defaced is skipped) or an
explicit ``--keep-faces`` (for brain-extracted or non-head volumes); the report records that choice.

Real ids only ever live in memory: they are turned into keyed pseudonyms before anything is written,
and the report refers to skipped inputs by pseudonymous references, never by path.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from generators.errors import InvalidInput, SynthCohortError
from train.deface import METHOD as DEFACE_METHOD
from train.deface import deface as remove_face
from train.deidentify import Pseudonymizer, clean_age, clean_sex, new_secret, normalise_patient_id
from train.ingest_options import LABEL_PATTERN, LABEL_RULE, IngestOptions, check_request
from train.parallel import worker_pool
from train.preprocess import Slab, axial_slices, isotropic_volume
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
from train.store import CohortStore, SliceRecord, StoreWriter, previous_secret

FACES_KEPT = "kept: --keep-faces (the operator confirmed the volumes carry no face)"
NOT_AN_IMAGE = "not a readable NIfTI, DICOM or .npz file"
NOT_DECLARED = "label not declared (--declare-labels)"


@dataclass(frozen=True)
class InputItem:
    """One thing to read: a NIfTI file, a DICOM series folder, or a MedMNIST archive."""

    kind: str  # "nifti" | "dicom" | "npz" | "other" (a file that is none of these: reported, never read)
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
    patient_id: str  # DICOM PatientID (may be empty), NIfTI file stem, archive image key
    slab: Slab
    npz_label: int | None = None
    scan_key: str = ""  # how a ``scan`` column of the labels file names this scan
    folder: str = ""  # the DICOM series folder's name, or the NIfTI file's folder name
    stem: str = ""  # the NIfTI file name without suffix
    modality: str = ""  # the DICOM Modality ("" for NIfTI and archives)
    uncalibrated: bool = False  # a 2-D projection without a usable pixel spacing (read at 1 mm per pixel)


@dataclass
class Labels:
    """The labels file: labels per (normalised) patient id, and the optional scan → patient map."""

    patients: dict[str, PatientLabel] = field(default_factory=dict)
    scan_owner: dict[str, str] = field(default_factory=dict)


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
def read_labels(path: Path, pseudo: Pseudonymizer) -> tuple[Labels, list[Skipped]]:
    """Parse ``[scan,]patient_id,label[,age,sex]``; bad rows are skipped with a reason (by row number)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "patient_id" not in columns or "label" not in columns:
                raise InvalidInput(f"labels file must have columns [scan,]patient_id,label[,age,sex]; found {columns}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"cannot read labels file {path.name}: {type(exc).__name__}") from None

    labels: dict[str, PatientLabel] = {}
    scan_owner: dict[str, str] = {}
    skipped: list[Skipped] = []
    conflicting: set[str] = set()
    for number, row in enumerate(rows, start=2):
        ref = pseudo.reference(f"labels-row-{number}")
        patient, label = normalise_patient_id(row.get("patient_id", "")), row.get("label", "")
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
        scan = row.get("scan", "")
        if scan:
            if scan_owner.get(scan, patient) != patient:
                skipped.append(Skipped(ref, "label-row", f"row {number}: scan already mapped to another patient"))
                continue
            scan_owner[scan] = patient
    for patient in sorted(conflicting):
        del labels[patient]
        skipped.append(Skipped(pseudo.patient(patient), "label-row", "patient has conflicting labels"))
    return Labels(labels, scan_owner), skipped


# ---------------------------------------------------------------------------------------- discovery
def discover(root: Path, *, exclude: set[Path] | None = None) -> Iterator[InputItem]:
    """Yield input items under ``root`` in a stable order: every file is accounted for (files that are no scan,
    and symbolic links, which are not followed, come as ``other``). Hidden folders are not entered."""
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
            if path.resolve() in exclude:
                continue
            if path.is_symlink():
                yield InputItem("other", path)  # links are not followed, but they are reported
            elif is_nifti(path):
                yield InputItem("nifti", path)
            elif name.lower().endswith(".npz"):
                yield InputItem("npz", path)
            elif is_dicom_file(path):
                has_dicom = True
            else:
                yield InputItem("other", path)
        if has_dicom:
            yield InputItem("dicom", base)


# ------------------------------------------------------------------------------------------ loading
def load_item(item: InputItem, options: IngestOptions, scan_key: str = "") -> LoadedScan:
    """Read one NIfTI or DICOM item into slices, or one volume for ``--dims 3`` (runs in worker processes); with
    ``--deface`` its face is removed first (or it is refused)."""
    modality, uncalibrated = "", False
    if item.kind == "nifti":
        scan, patient, folder = read_nifti(item.path), nifti_stem(item.path), item.path.parent.name
    elif item.kind == "dicom":
        series = read_dicom_series(item.path, allow_burned_in=options.allow_burned_in, allow_2d=options.allow_2d)
        scan, patient, folder, modality = series.scan, series.patient_id.strip(), item.path.name, series.modality
        uncalibrated = series.uncalibrated
        if series.projection and (options.dims == 3 or options.deface):
            raise InvalidInput(f"a {modality} image is 2-D: --dims 3 and --deface need head volumes")
    else:
        raise InvalidInput(f"unsupported input kind {item.kind}")
    if options.deface:
        scan = remove_face(scan).scan
    if options.dims == 3:
        slab = isotropic_volume(scan, size=options.size)
    else:
        slab = axial_slices(scan, n_slices=options.slices, size=options.size)
    stem = nifti_stem(item.path) if item.kind == "nifti" else ""
    return LoadedScan(
        patient_id=patient,
        slab=slab,
        scan_key=scan_key,
        folder=folder,
        stem=stem,
        modality=modality,
        uncalibrated=uncalibrated,
    )


def scan_key(item: InputItem, root: Path) -> str:
    """How the labels file's ``scan`` column names an item: NIfTI stem, or DICOM folder relative to the input."""
    if item.kind == "nifti":
        return nifti_stem(item.path)
    return item.path.relative_to(root).as_posix() if root.is_dir() and item.path != root else item.path.name


def _load_safely(args: tuple[InputItem, IngestOptions, str]) -> LoadedScan | str:
    item, options, key = args
    try:
        return load_item(item, options, scan_key=key)
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
        yield LoadedScan(patient_id=key, slab=slab, npz_label=image.label, scan_key=key)


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
    # 1. check inputs, read the labels file, find the scans
    check_request(options, out)
    secret = (previous_secret(out) if options.overwrite and not options.reset_budget else None) or new_secret()
    pseudo = Pseudonymizer(secret)
    labels, skipped = Labels(), list[Skipped]()
    if labels_path is not None:
        if not labels_path.is_file():
            raise InvalidInput(f"labels file {labels_path} does not exist")
        labels, skipped = read_labels(labels_path, pseudo)
    items = list(discover(input_path, exclude={labels_path} if labels_path else None))
    others = sum(1 for i in items if i.kind == "other")
    if len(items) == others:
        raise InvalidInput(f"no NIfTI, DICOM or .npz inputs found under {input_path} ({others} other files)")
    if labels_path is None and any(i.kind in ("nifti", "dicom") for i in items):
        raise InvalidInput("--labels is required for NIfTI and DICOM inputs")
    if on_total:
        on_total(len(items))

    # 2. load every scan (in worker processes) and attach it to its patient
    cohort = _Cohort(labels, pseudo, skipped, set(options.labels))
    previous = None
    for item, result in _load_all(items, input_path, options, pseudo):
        if isinstance(result, str):
            skipped.append(Skipped(_reference(pseudo, item, input_path), item.kind, result, str(item.path)))
        else:
            cohort.accept(result, item, options.link_by)
        if progress and item is not previous:  # an archive yields many images: count it once
            progress(1)
        previous = item
    if not cohort.pending:
        raise NothingUsable(
            f"nothing usable: {len(items)} inputs found, all skipped "
            f"({_summarise(skipped)}); run with --show-paths to see which",
            skipped,
        )

    _check_label_counts(cohort, options)
    if len(cohort.modalities) > 1:
        raise InvalidInput(
            f"the input mixes DICOM modalities {sorted(cohort.modalities)}: one store holds one modality; "
            "ingest each modality from its own folder"
        )

    # 3. split by patient, write the store (with its DP patient count) atomically
    split_of = cohort.split(options)
    with StoreWriter(out, size=options.size, spatial_dims=options.dims, overwrite=options.overwrite) as writer:
        for pseudonym, scan_no, slab in cohort.pending:
            writer.add(slab.images, cohort.records(pseudonym, scan_no, slab, split_of[pseudonym]))
        report = _report(
            options=options,
            n_inputs=len(items),
            cohort=cohort,
            split_of=split_of,
            labelled_without_scan=len(set(labels.patients) - cohort.seen_ids),
            skipped=skipped,
        )
        store = writer.commit(
            label_names=sorted(options.labels),  # declared, not read off the data
            report=report,
            secret=secret,
            privacy_unit=cohort.privacy_unit,
            budget_epsilon=options.store_budget,
            reset_budget=options.reset_budget,
        )
    return IngestResult(store=store, report=report, skipped=skipped)


def _check_label_counts(cohort: _Cohort, options: IngestOptions) -> None:
    """Refuse a declared label held by fewer than ``min_label_patients`` patients: a published label held by a
    handful of patients would say that they are in the cohort, and their diagnosis, outside ε."""
    counts = Counter(info.label for info in cohort.info.values())
    thin = [label for label in options.labels if counts[label] < options.min_label_patients]
    if thin:
        raise InvalidInput(
            f"declared label(s) {thin} are held by fewer than {options.min_label_patients} patients each: a model "
            "would publish that so few patients carry them. Leave them out of --declare-labels (their patients are "
            "then skipped), merge them into a broader label in the labels file, or lower --min-label-patients once "
            "the privacy officer has agreed"
        )


def _reference(pseudo: Pseudonymizer, item: InputItem, root: Path) -> str:
    return pseudo.reference(str(item.path.relative_to(root) if root.is_dir() else item.path.name))


def _load_all(
    items: list[InputItem], root: Path, options: IngestOptions, pseudo: Pseudonymizer
) -> Iterator[tuple[InputItem, LoadedScan | str]]:
    """Every item's scans (NIfTI/DICOM in a process pool, then MedMNIST archives), or why it was skipped."""
    for item in (i for i in items if i.kind == "other"):
        yield item, ("a symbolic link (not followed)" if item.path.is_symlink() else NOT_AN_IMAGE)
    scan_items = [i for i in items if i.kind in ("nifti", "dicom")]
    jobs = [(i, options, scan_key(i, root)) for i in scan_items]
    if options.workers > 1 and len(jobs) > 1:
        with worker_pool(options.workers) as pool:
            yield from zip(scan_items, pool.map(_load_safely, jobs, chunksize=4), strict=True)
    else:
        for item, job in zip(scan_items, jobs, strict=True):
            yield item, _load_safely(job)
    for item in (i for i in items if i.kind == "npz"):
        if options.deface:
            yield item, "a MedMNIST archive holds 2-D images, which --deface cannot register to a head"
            continue
        if options.dims == 3:
            yield item, "a MedMNIST archive holds 2-D images; --dims 3 needs volumes (NIfTI or DICOM series)"
            continue
        try:
            for result in _load_npz(item, options.size, options.slices):
                # a per-image failure is reported by the image's own pseudonymous reference
                yield (
                    item,
                    (f"{result[1]} (image {pseudo.reference(result[0])})" if isinstance(result, tuple) else result),
                )
        except SynthCohortError as exc:
            yield item, str(exc)


class _Cohort:
    """The accepted scans grouped by patient pseudonym (real ids live only in memory, here)."""

    def __init__(self, labels: Labels, pseudo: Pseudonymizer, skipped: list[Skipped], declared: set[str]) -> None:
        self.labels, self.pseudo, self.skipped, self.declared = labels, pseudo, skipped, declared
        self.info: dict[str, PatientLabel] = {}
        self.real_of: dict[str, str] = {}  # pseudonym → normalised id (the split ranks the keyed id)
        self.scans_of: Counter[str] = Counter()
        self.slices_of: Counter[str] = Counter()
        self.seen_ids: set[str] = set()
        self.modalities: set[str] = set()
        self.uncalibrated = 0  # 2-D projections read at 1 mm per pixel: their export had no usable spacing
        self.pending: list[tuple[str, int, Slab]] = []
        self.privacy_unit = "patient"

    def accept(self, loaded: LoadedScan, item: InputItem, link_by: str = "auto") -> None:
        owner = self.labels.scan_owner.get(loaded.scan_key)
        patient = owner or self._link(loaded, item, link_by)
        if patient is None:
            return
        info = self.labels.patients.get(patient)
        if info is None and loaded.npz_label is not None:
            info = PatientLabel(label=str(loaded.npz_label))
        if info is None:
            ref = self.pseudo.reference(loaded.scan_key or item.path.name)
            self.skipped.append(Skipped(ref, item.kind, "no label for this patient in the labels file", str(item.path)))
            return
        if info.label not in self.declared:
            ref = self.pseudo.reference(loaded.scan_key or item.path.name)
            self.skipped.append(Skipped(ref, item.kind, NOT_DECLARED, str(item.path)))
            return
        if item.kind == "npz" and owner is None:
            self.privacy_unit = "image"  # nothing says which images share a person
        pseudonym = self.pseudo.patient(patient)
        self.real_of[pseudonym] = patient
        self.info[pseudonym] = info
        self.pending.append((pseudonym, self.scans_of[pseudonym], loaded.slab))
        self.scans_of[pseudonym] += 1
        self.slices_of[pseudonym] += len(loaded.slab.positions)
        self.seen_ids.add(patient)
        if loaded.modality:
            self.modalities.add(loaded.modality)
        self.uncalibrated += int(loaded.uncalibrated)

    def _link(self, loaded: LoadedScan, item: InputItem, link_by: str) -> str | None:
        """The patient id a scan belongs to (``--link-by``); ``None`` (skipped with the reason) when the ways
        allowed name two different patients of the labels file."""
        if item.kind == "npz":
            return normalise_patient_id(loaded.patient_id)
        by = {
            "patient-id": [loaded.patient_id or (loaded.folder if item.kind == "dicom" else "")],
            "folder": [loaded.folder],
            "stem": [loaded.stem],
            "auto": [loaded.patient_id, loaded.folder] if item.kind == "dicom" else [loaded.stem],
        }[link_by]
        ids = [normalise_patient_id(i) for i in by if i and normalise_patient_id(i)]
        known = sorted({i for i in ids if i in self.labels.patients})
        if len(known) > 1:
            ref = self.pseudo.reference(loaded.scan_key or item.path.name)
            reason = (
                "its PatientID and its folder name are two different patients of the labels file; choose with "
                "--link-by patient-id or --link-by folder"
            )
            self.skipped.append(Skipped(ref, item.kind, reason, str(item.path)))
            return None
        return known[0] if known else (ids[0] if ids else normalise_patient_id(item.path.name))

    def split(self, options: IngestOptions) -> dict[str, str]:
        """Train/holdout by the keyed rank of each patient's normalised id (the store's secret, no public seed)."""
        label_of = {p: i.label for p, i in self.info.items()}
        return split_patients(label_of, holdout=options.holdout, rank=lambda p: self.pseudo.split_rank(self.real_of[p]))

    def records(self, pseudonym: str, scan_no: int, slab: Slab, split: str) -> list[SliceRecord]:
        info = self.info[pseudonym]
        return [
            SliceRecord(
                patient=pseudonym,
                split=split,
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


def _summarise(skipped: list[Skipped]) -> str:
    counts = Counter(s.reason.split(":")[0].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "none"


def _faces(options: IngestOptions) -> str | None:
    if options.deface:
        return f"removed from every stored scan (--deface): {DEFACE_METHOD}; scans it could not deface were skipped"
    return FACES_KEPT if options.dims == 3 else None


def _report(
    *,
    options: IngestOptions,
    n_inputs: int,
    cohort: _Cohort,
    split_of: dict[str, str],
    labelled_without_scan: int,
    skipped: list[Skipped],
) -> dict:
    patients: dict[str, Counter[str]] = defaultdict(Counter)
    slices: dict[str, Counter[str]] = defaultdict(Counter)
    for pseudonym, info in cohort.info.items():
        patients[split_of[pseudonym]][info.label] += 1
        slices[split_of[pseudonym]][info.label] += cohort.slices_of[pseudonym]
    return {
        "settings": {
            "dims": options.dims,
            "size": options.size,
            "slices_per_scan": options.slices if options.dims == 2 else None,
            "axis": "axial" if options.dims == 2 else "volume (isotropic grid, RAS)",
            "faces": _faces(options),
            "holdout": options.holdout,
            "split": "lowest keyed rank per label (HMAC of the store's secret and the normalised id)",
            "declared_labels": list(options.labels),
            "min_label_patients": options.min_label_patients,
            "allow_burned_in": options.allow_burned_in,
            "store_budget_epsilon": options.store_budget,
        },
        "privacy_unit": cohort.privacy_unit,
        "modality": next(iter(cohort.modalities), None),
        "inputs": {"found": n_inputs, "skipped": sum(1 for s in skipped if s.kind != "label-row")},
        "defaced_scans": sum(cohort.scans_of.values()) if options.deface else 0,
        "images_without_pixel_spacing": cohort.uncalibrated,
        "patients": {split: dict(sorted(c.items())) for split, c in sorted(patients.items())},
        "slices": {split: dict(sorted(c.items())) for split, c in sorted(slices.items())},
        "patients_with_multiple_scans": sum(1 for n in cohort.scans_of.values() if n > 1),
        "labelled_patients_without_usable_scan": labelled_without_scan,
        "skipped": [s.public() for s in skipped],
        "skipped_summary": _summarise(skipped),
        "deidentification": (
            "Only pixels and voxel geometry were kept; every header field was dropped. Patient ids are "
            "normalised (case, whitespace, zero padding) and replaced by HMAC-SHA256 pseudonyms keyed with this "
            "store's secret; ages over 89 are reported as 90; skipped inputs are listed by pseudonymous "
            "reference, not by path."
        ),
    }
