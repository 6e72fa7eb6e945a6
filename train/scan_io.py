"""All scan file I/O: NIfTI, DICOM series (single- and multi-frame) and MedMNIST ``.npz``.

Every reader returns a :class:`Scan`, which holds pixels and geometry only: no header field survives
reading. DICOM readers also return the ``PatientID`` so ingestion can link a series to its label; that
value is used for the pseudonym and then dropped.

Coordinate convention: ``Scan.data`` is indexed ``[i, j, k]`` in RAS+ canonical voxel order (``i``
increases to the patient's Right, ``j`` to Anterior, ``k`` to Superior) and ``Scan.affine`` maps voxel
indices to world millimetres in RAS.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from generators.errors import InvalidInput

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, repr=False)
class Scan:
    """A 3-D scan: ``data`` float32 ``[X, Y, Z]`` in RAS+ voxel order and a 4x4 voxel→world ``affine``."""

    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise InvalidInput(f"a scan must be 3-D, got shape {self.data.shape}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise InvalidInput("a scan needs a finite 4x4 affine")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-6:
            raise InvalidInput("the scan's affine is singular (zero voxel size?)")
        if not np.all(np.isfinite(self.data)):
            raise InvalidInput("the scan contains NaN or infinite values")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``i, j, k``."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.2f}" for s in self.spacing)
        return f"Scan(shape={self.data.shape}, spacing=({spacing}) mm)"


def canonical(data: np.ndarray, affine: np.ndarray) -> Scan:
    """Reorient a volume to the closest RAS+ voxel order (a permutation and flips, no resampling)."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine))
    return Scan(np.asarray(image.dataobj, dtype=np.float32), image.affine.copy())


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: Path) -> Scan:
    """Read a 3-D NIfTI (a trailing singleton 4th axis is accepted) and reorient it to RAS+."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InvalidInput(f"unreadable NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInput(f"expected a 3-D volume, got {data.ndim}-D shape {data.shape}")
    return canonical(data, affine)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype: type = np.float32) -> None:
    """Write a NIfTI with a real affine (qform and sform set). ``data`` is stored as ``dtype``."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


# --------------------------------------------------------------------------------------------- DICOM
def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM preamble magic (``DICM`` at byte 128)."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomSeries:
    """A decoded DICOM series: the scan, the ``PatientID`` used for linkage, and how many files."""

    scan: Scan
    patient_id: str
    n_files: int
    modality: str = ""
    projection: bool = False  # a 2-D projection image (radiograph, ultrasound frame): no volume geometry
    uncalibrated: bool = False  # a projection without a usable pixel spacing: read at 1 mm per pixel


PROJECTIONS = frozenset({"CR", "DX", "MG", "RG", "IO", "PX"})  # radiographs: 2-D by nature
PROJECTIONS_OPT_IN = frozenset({"US", "SC", "XC", "OT"})  # single frames of these only with allow_2d
NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})
# Modalities whose pixels often carry burned-in text (names, dates, markers): without BurnedInAnnotation = NO they
# are refused, since a missing tag means "unknown", not "no"
BURN_PRONE = frozenset({"CR", "DX", "MG", "RG", "IO", "PX", "XA", "RF", "US", "SC", "XC", "OT", "ES"})


def read_dicom_series(folder: Path, *, allow_burned_in: bool = False, allow_2d: bool = False) -> DicomSeries:
    """Read one DICOM series from a folder (one multi-frame file or one file per slice). A projection image
    (CR, DX, MG, ...; with ``allow_2d`` also single-frame US, SC) without patient geometry is read as a 2-D image
    with its pixel spacing."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise InvalidInput("no DICOM files in the series folder")
    try:
        datasets = [pydicom.dcmread(str(p)) for p in files]
    except Exception as exc:
        raise InvalidInput(f"unreadable DICOM file ({type(exc).__name__})") from None

    for ds in datasets:
        modality = str(ds.get("Modality", "")).upper()
        if not modality and "PixelData" not in ds:
            raise InvalidInput("a DICOM file with neither pixels nor a Modality (corrupt, or not an image)")
        if modality in NOT_IMAGES or "PixelData" not in ds:
            raise InvalidInput(f"not an image series (Modality {modality or 'missing'}: a label map or a document)")
        _check_burned_in(ds, modality, allow_burned_in)
    patient_ids = {str(ds.get("PatientID", "")) for ds in datasets}
    if len(patient_ids) != 1:
        raise InvalidInput("files of one series folder belong to different patients")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise InvalidInput("the folder mixes several DICOM series; put each series in its own folder")

    modality = str(datasets[0].get("Modality", "")).upper()
    frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
    projection = "ImageOrientationPatient" not in datasets[0] and (
        modality in PROJECTIONS or (allow_2d and modality in PROJECTIONS_OPT_IN)
    )
    uncalibrated = False
    if projection:
        if len(datasets) != 1 or frames != 1:
            raise InvalidInput(f"a {modality} series must be one single-frame image to be read as a 2-D image")
        scan, uncalibrated = _projection_to_scan(datasets[0])
    elif modality in PROJECTIONS_OPT_IN and "ImageOrientationPatient" not in datasets[0]:
        raise InvalidInput(f"a {modality} image has no patient geometry; read it as a 2-D image with --allow-2d")
    elif len(datasets) == 1 and frames > 1:
        scan = _multiframe_to_scan(datasets[0])
    else:
        scan = _single_frames_to_scan(datasets)
    return DicomSeries(
        scan=scan,
        patient_id=patient_ids.pop(),
        n_files=len(files),
        modality=modality,
        projection=projection,
        uncalibrated=uncalibrated,
    )


def _check_burned_in(ds: object, modality: str, allow_burned_in: bool) -> None:
    """Refuse pixels that may carry burned-in text: marked YES, or unmarked in a modality where it is common."""
    if allow_burned_in:
        return
    marked = str(getattr(ds, "BurnedInAnnotation", "") or "").upper()
    if marked == "YES":
        raise InvalidInput("BurnedInAnnotation=YES: text may be burned into the pixels (use --allow-burned-in)")
    if marked != "NO" and modality in BURN_PRONE:
        raise InvalidInput(
            f"BurnedInAnnotation unknown: {modality} images often carry burned-in text (names, dates) and this one "
            "does not say it has none; check the pixels, then use --allow-burned-in"
        )


def _projection_to_scan(ds: object) -> tuple[Scan, bool]:
    """A radiograph or single ultrasound frame as displayed (colour → luminance, MONOCHROME1 inverted), with the
    pixel spacing of its PixelSpacing, ImagerPixelSpacing or ultrasound region; where none is usable (absent, or
    0\\0 as many exports write) at 1 mm per pixel, and ``True`` says so (the ingest report counts them)."""
    pixels = _pixels(ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if pixels.ndim != 2:
        raise InvalidInput(f"a 2-D image was expected, got pixel data of shape {pixels.shape}")
    pixels = _rescale(pixels, getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None))
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    spacing = _projection_spacing(ds)
    return scan_from_display(pixels, spacing_mm=spacing or 1.0), spacing is None


def _projection_spacing(ds: object) -> tuple[float, float] | None:
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        if getattr(ds, name, None) is not None:
            row, col = _floats(getattr(ds, name), 2, name)
            if row > 0 and col > 0:  # some exports write 0\0 for "unknown"
                return float(row), float(col)
    region = _first(getattr(ds, "SequenceOfUltrasoundRegions", None))
    if region is not None and getattr(region, "PhysicalUnitsXDirection", None) == 3:  # 3: centimetres
        return float(region.PhysicalDeltaY) * 10.0, float(region.PhysicalDeltaX) * 10.0
    return None


def _pixels(ds: object) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array, dtype=np.float32)  # type: ignore[attr-defined]
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise InvalidInput(f"cannot decode pixel data (transfer syntax {name}: {type(exc).__name__})") from None


def _floats(values: object, n: int, what: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]
    except Exception:
        raise InvalidInput(f"missing or malformed DICOM geometry: {what}") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InvalidInput(f"missing or malformed DICOM geometry: {what}")
    return out


def _volume_affine(
    orientation: np.ndarray, spacing: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sort slices along the normal and return ``(order, RAS affine)`` for voxel index ``[col, row, slice]``.

    ``orientation`` is ImageOrientationPatient (row cosine, column cosine), ``spacing`` is PixelSpacing
    (between rows, between columns), ``positions`` is ``[n, 3]`` ImagePositionPatient, all in LPS mm.
    """
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if len(order) > 1:
        if np.any(steps < 1e-3):
            raise InvalidInput("duplicate slice positions in the DICOM series")
        if np.ptp(steps) > 0.01 * float(np.median(steps)) + 1e-3:
            raise InvalidInput("non-uniform slice spacing in the DICOM series")
        slice_vec = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    else:
        slice_vec = normal * 1.0
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # i = column index moves along the row direction
    lps[:3, 1] = col_cos * spacing[0]  # j = row index moves along the column direction
    lps[:3, 2] = slice_vec
    lps[:3, 3] = positions[order[0]]
    return order, _LPS_TO_RAS @ lps


def _rescale(pixels: np.ndarray, slope: Any, intercept: Any) -> np.ndarray:
    slope_f = float(slope) if slope not in (None, "") else 1.0
    intercept_f = float(intercept) if intercept not in (None, "") else 0.0
    return pixels * np.float32(slope_f) + np.float32(intercept_f)


def _single_frames_to_scan(datasets: list) -> Scan:
    first = datasets[0]
    orientation = _floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
    spacing = _floats(first.get("PixelSpacing"), 2, "PixelSpacing")
    shape = (first.get("Rows"), first.get("Columns"))
    for ds in datasets:
        if (ds.get("Rows"), ds.get("Columns")) != shape:
            raise InvalidInput("slices of the DICOM series have different sizes")
        if not np.allclose(_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"), orientation):
            raise InvalidInput("slices of the DICOM series have different orientations")
    positions = np.stack([_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient") for ds in datasets])
    order, affine = _volume_affine(orientation, spacing, positions)
    slices = [
        _rescale(_pixels(datasets[i]), datasets[i].get("RescaleSlope"), datasets[i].get("RescaleIntercept"))
        for i in order
    ]
    volume = np.stack(slices, axis=-1)  # (rows, cols, slices)
    return canonical(volume.transpose(1, 0, 2), affine)  # (cols, rows, slices) = voxel [i, j, k]


def _multiframe_to_scan(ds: object) -> Scan:
    shared = _first(getattr(ds, "SharedFunctionalGroupsSequence", None))
    per_frame = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []) or [])
    frames = _pixels(ds)  # (frames, rows, cols)
    if frames.ndim != 3:
        raise InvalidInput(f"multi-frame DICOM with pixel data of shape {frames.shape} (colour or 4-D): not a stack")
    if len(per_frame) != frames.shape[0]:
        return _stack_by_frame_order(ds, shared, frames)

    def group_item(frame: object, sequence: str) -> object:
        item = _first(getattr(frame, sequence, None))
        return item if item is not None else _first(getattr(shared, sequence, None))

    orientation = _floats(
        getattr(group_item(per_frame[0], "PlaneOrientationSequence"), "ImageOrientationPatient", None),
        6,
        "ImageOrientationPatient",
    )
    spacing = _floats(
        getattr(group_item(per_frame[0], "PixelMeasuresSequence"), "PixelSpacing", None), 2, "PixelSpacing"
    )
    positions = np.stack(
        [
            _floats(
                getattr(group_item(f, "PlanePositionSequence"), "ImagePositionPatient", None),
                3,
                "ImagePositionPatient",
            )
            for f in per_frame
        ]
    )
    order, affine = _volume_affine(orientation, spacing, positions)
    transform = group_item(per_frame[0], "PixelValueTransformationSequence")
    slope = getattr(transform, "RescaleSlope", None) if transform is not None else ds.get("RescaleSlope")  # type: ignore[attr-defined]
    intercept = (
        getattr(transform, "RescaleIntercept", None) if transform is not None else ds.get("RescaleIntercept")  # type: ignore[attr-defined]
    )
    volume = _rescale(frames[order], slope, intercept).transpose(2, 1, 0)  # (cols, rows, frames)
    return canonical(volume, affine)


def _stack_by_frame_order(ds: object, shared: object, frames: np.ndarray) -> Scan:
    """A legacy multi-frame image without per-frame geometry: frames in file order, one slice spacing apart along
    the normal, when orientation, pixel spacing, the first frame's position and the slice spacing are all given
    (at the top level or in the shared functional groups); otherwise refused with what is missing."""

    def attribute(name: str, sequence: str) -> Any:
        value = getattr(ds, name, None)
        return value if value is not None else getattr(_first(getattr(shared, sequence, None)), name, None)

    given = {
        "ImageOrientationPatient": attribute("ImageOrientationPatient", "PlaneOrientationSequence"),
        "PixelSpacing": attribute("PixelSpacing", "PixelMeasuresSequence"),
        "ImagePositionPatient": attribute("ImagePositionPatient", "PlanePositionSequence"),
        "SpacingBetweenSlices or SliceThickness": attribute("SpacingBetweenSlices", "PixelMeasuresSequence")
        or attribute("SliceThickness", "PixelMeasuresSequence"),
    }
    missing = [name for name, value in given.items() if value in (None, "")]
    if missing:
        raise InvalidInput(
            "multi-frame DICOM without per-frame geometry and without a stack to order its frames by "
            f"(missing: {', '.join(missing)})"
        )
    orientation = _floats(given["ImageOrientationPatient"], 6, "ImageOrientationPatient")
    spacing = _floats(given["PixelSpacing"], 2, "PixelSpacing")
    first = _floats(given["ImagePositionPatient"], 3, "ImagePositionPatient")
    step = float(given["SpacingBetweenSlices or SliceThickness"])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = first + np.arange(len(frames))[:, None] * step * normal
    order, affine = _volume_affine(orientation, spacing, positions)
    slope, intercept = getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None)
    return canonical(_rescale(frames[order], slope, intercept).transpose(2, 1, 0), affine)


def _first(sequence: object) -> Any:
    try:
        return sequence[0] if sequence is not None and len(sequence) > 0 else None  # type: ignore[index,arg-type]
    except TypeError:
        return None


# ------------------------------------------------------------------------------------------ MedMNIST
@dataclass(frozen=True)
class NpzImage:
    """One image from a MedMNIST-style archive: ``key`` like ``train-00012``, pixels and integer label."""

    key: str
    pixels: np.ndarray
    label: int


def read_medmnist(path: Path) -> Iterator[NpzImage]:
    """Yield the images of a MedMNIST ``.npz`` (``{split}_images`` + ``{split}_labels`` arrays).

    2-D images are ``[N, H, W]`` (or ``[N, H, W, 3]``, averaged to grey); 3-D are ``[N, D, H, W]``.
    """
    try:
        archive = np.load(str(path), allow_pickle=False)
        keys = set(archive.files)
    except Exception as exc:
        raise InvalidInput(f"unreadable .npz archive ({type(exc).__name__})") from None
    splits = sorted(k[: -len("_images")] for k in keys if k.endswith("_images") and f"{k[:-7]}_labels" in keys)
    if not splits:
        raise InvalidInput("not a MedMNIST archive: expected '<split>_images' and '<split>_labels' arrays")
    for split in splits:
        images = archive[f"{split}_images"]
        labels = np.asarray(archive[f"{split}_labels"]).reshape(len(images), -1)
        if labels.shape[1] != 1:
            raise InvalidInput("multi-label MedMNIST archives are not supported (one label per image expected)")
        if images.ndim == 4 and images.shape[-1] == 3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images = images.mean(axis=-1)
        for index, (pixels, label) in enumerate(zip(images, labels[:, 0], strict=True)):
            yield NpzImage(key=f"{split}-{index:06d}", pixels=np.asarray(pixels, dtype=np.float32), label=int(label))


def scan_from_display(pixels: np.ndarray, spacing_mm: float | tuple[float, float] = 1.0) -> Scan:
    """Wrap a display-ordered image (``[H, W]`` or ``[D, H, W]``, rows top→bottom) as a RAS+ scan; spacing: one
    value, or ``(row, column)`` mm with 1 mm between slices.

    Rows become posterior→anterior reversed (top of the image = anterior), columns left→right, and the
    depth axis inferior→superior, so :func:`train.preprocess.axial_slices` gives the image back unchanged.
    """
    volume = pixels[None] if pixels.ndim == 2 else pixels
    if volume.ndim != 3:
        raise InvalidInput(f"expected a 2-D or 3-D image, got shape {pixels.shape}")
    data = np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0))  # (D, H, W) -> (W, H, D)
    if isinstance(spacing_mm, tuple):
        (row_mm, col_mm), slice_mm = spacing_mm, 1.0
    else:
        row_mm = col_mm = slice_mm = float(spacing_mm)
    affine = np.diag([col_mm, row_mm, slice_mm, 1.0])
    return Scan(data.astype(np.float32), affine)
