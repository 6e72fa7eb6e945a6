"""The embedded demo cohort: synthetic "patients" derived from the real MNI152 T1 brain template.

The template ships inside nilearn (ICBM 2009a symmetric, resampled to a 2 mm grid), so no download is
needed. Each patient gets its own smooth random deformation and small affine, known anatomy of age and sex
(ventricles widen and the brain shrinks with age, male brains are larger: :func:`_ageing`), intensity scaling,
a multiplicative bias field and Rician noise; ``lesion`` patients also get a tumour-like blob of random size,
position and contrast inside the brain, near the volume centre so the central axial slab shows it.

Layout written by :func:`make_demo_cohort`::

    OUT/labels.csv                 patient_id,label,age,sex
    OUT/nifti/<patient_id>.nii.gz  every patient (int16, real affine; some stored left-right flipped)
    OUT/dicom/<patient_id>/        ~20 % of patients again as a DICOM series with fake PHI in the
                                   headers (half one file per slice, half one multi-frame file)
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generators.atomic import publish_directory
from generators.errors import Conflict, InvalidInput
from train.parallel import worker_pool
from train.public_prior import load_template
from train.scan_io import write_nifti

LABELS = ("healthy", "lesion")
FIRST_NAMES = ("JANE", "JOHN", "MARIA", "AHMED", "WEI", "OLGA", "KWAME", "LUCIA", "HIROSHI", "PRIYA", "TOMAS", "ANNA")
LAST_NAMES = ("DOE", "SMITH", "GARCIA", "MUELLER", "NGUYEN", "OKAFOR", "ROSSI", "TANAKA", "KOWALSKI", "SILVA")
INSTITUTIONS = ("ST. BARNABAS GENERAL HOSPITAL", "NORTHGATE UNIVERSITY MEDICAL CENTER", "RIVERSIDE CLINIC")
PHYSICIANS = ("HOUSE^GREGORY^^DR", "QUINN^MICHAELA^^DR", "KILDARE^JAMES^^DR")
PRIVATE_CREATOR = "SYNTHCOHORT DEMO PHI"


@dataclass(frozen=True)
class DemoPatient:
    """What the generator decides for one patient (the fake identity is only ever written to raw files)."""

    index: int
    patient_id: str
    label: str
    age: int
    sex: str
    name: str
    birth_date: str
    study_date: str
    accession: str
    institution: str
    physician: str
    dicom: str  # "" | "single" | "multi"
    flip_storage: bool


def plan_patients(n: int, seed: int, dicom_fraction: float = 0.2) -> list[DemoPatient]:
    """Deterministic identities, labels (balanced) and covariates for ``n`` patients."""
    if n < 2:
        raise InvalidInput(f"--patients must be at least 2, got {n}")
    if not 0.0 <= dicom_fraction <= 1.0:
        raise InvalidInput(f"dicom fraction must be in [0, 1], got {dicom_fraction}")
    rng = np.random.default_rng([seed, 0xC0407])
    labels = np.array([LABELS[i % len(LABELS)] for i in range(n)])[rng.permutation(n)]
    ids = rng.permutation(900_000)[:n] + 7_100_000
    dicom_pick = rng.random(n) < dicom_fraction
    patients = []
    for i in range(n):
        age = int(rng.integers(18, 97))  # a few over 89, to exercise the Safe Harbor cap
        study_year, study_month, study_day = (
            2020 + int(rng.integers(0, 6)),
            int(rng.integers(1, 13)),
            int(rng.integers(1, 29)),
        )
        patients.append(
            DemoPatient(
                index=i,
                patient_id=f"MRN{ids[i]:07d}",
                label=str(labels[i]),
                age=age,
                sex=str(rng.choice(["F", "M"])),
                name=f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
                birth_date=f"{study_year - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
                study_date=f"{study_year:04d}{study_month:02d}{study_day:02d}",
                accession=f"ACC{int(rng.integers(10**8, 10**9))}",
                institution=str(rng.choice(INSTITUTIONS)),
                physician=str(rng.choice(PHYSICIANS)),
                dicom=("single" if i % 2 == 0 else "multi") if dicom_pick[i] else "",
                flip_storage=bool(rng.random() < 0.3),
            )
        )
    return patients


def synthesize_volume(patient: DemoPatient, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One patient's T1-like volume ``(int16 [X, Y, Z], RAS affine)``, deterministic in ``(seed, index)``."""
    import torch
    import torch.nn.functional as F

    template, affine = load_template()
    rng = np.random.default_rng([seed, patient.index])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    shape = template.shape
    volume = torch.from_numpy(template)[None, None]  # (1, 1, X, Y, Z)

    # 1. small affine + smooth random deformation, in grid_sample's normalised coordinates
    angles = np.deg2rad(rng.uniform(-5, 5, size=3))
    rotation = _rotation(*angles) * rng.uniform(0.94, 1.06, size=3)[None, :]
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = torch.from_numpy(rotation.astype(np.float32))
    theta[0, :, 3] = torch.from_numpy(rng.uniform(-0.03, 0.03, size=3).astype(np.float32))
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=False)  # (1, X, Y, Z, 3)
    coarse = torch.randn(1, 3, 5, 5, 5, generator=gen) * 0.025
    grid = _ageing(grid.add_(_smooth_field(coarse[0], shape, align_corners=True)), patient.age, patient.sex)
    warped = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]

    # 2. tumour-like lesion near the centre of the slab ingestion will take
    if patient.label == "lesion":  # own random stream, so the rest of the patient is the same either way
        warped = _add_lesion(warped, np.random.default_rng([seed, patient.index, 1]))

    # 3. bias field, global intensity scale, Rician noise
    bias = _smooth_field(torch.randn(1, 4, 4, 4, generator=gen) * 0.12, shape, align_corners=True)[..., 0]
    scaled = warped * torch.exp(bias) * float(rng.uniform(0.75, 1.25))
    sigma = float(rng.uniform(0.015, 0.035))
    real = scaled + sigma * torch.randn(shape, generator=gen)
    imag = sigma * torch.randn(shape, generator=gen)
    magnitude = torch.hypot(real, imag)
    data = np.clip(np.rint(magnitude.numpy() * 1000.0), 0, 32767).astype(np.int16)
    return data, affine


def _smooth_field(coarse, shape: tuple[int, ...], *, align_corners: bool):
    """``F.interpolate(coarse[None], size=shape, mode="trilinear")`` moved to channels last ``(X, Y, Z, C)`` for a
    coarse ``(C, x, y, z)``: trilinear interpolation is linear along each axis in turn, so it is three small
    matrix products (the same numbers, several times faster than the 3-D kernel at this size)."""
    import torch

    weights = [_linear_weights(n_in, n_out, align_corners) for n_in, n_out in zip(coarse.shape[1:], shape, strict=True)]
    return torch.einsum("ax,by,cz,nxyz->abcn", *weights, coarse)


def _linear_weights(n_in: int, n_out: int, align_corners: bool):
    """The ``(n_out, n_in)`` matrix of 1-D linear interpolation, with the source positions of ``F.interpolate``."""
    import torch

    out = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        source = out * ((n_in - 1) / max(n_out - 1, 1))
    else:
        source = ((out + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights[torch.arange(n_out), low] += 1.0 - (source - low)
    weights[torch.arange(n_out), high] += source - low
    return weights.float()


def _ageing(grid, age: int, sex: str):
    """Known anatomy of age and sex, as a change of sampling coordinates (normalised, volume centre 0):
    the ventricles widen (a radial magnification of the centre, up to 40 % at 90), the brain shrinks (6 % at
    90: the cortex recedes from where it was, widening the outer CSF), and male brains are 3 % larger.
    Scales ``grid`` in place."""
    import torch

    atrophy = float(np.clip((min(age, 90) - 20) / 70, 0.0, 1.0))
    scale = (1.0 + 0.06 * atrophy) / (1.03 if sex == "M" else 1.0)
    radius2 = (grid * grid).sum(-1, keepdim=True)
    # scale · (1 - 0.4 · atrophy · exp(-r² / 2·0.22²)): the ventricles (centre) widen
    factor = torch.exp(radius2.mul_(-1.0 / (2 * 0.22**2))).mul_(-0.4 * atrophy * scale).add_(scale)
    return grid.mul_(factor)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _add_lesion(volume, rng: np.random.Generator):  # (X, Y, Z) torch tensor
    import torch

    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    z_size = volume.shape[2]
    z0 = z_size // 2 + int(rng.integers(-2, 3))
    brain = (volume[:, :, z0] > 0.35).numpy()
    xs, ys = np.nonzero(brain)
    # keep the centre well inside the brain: drop the outer 15 % of the in-plane brain extent
    inner = (np.abs(xs - xs.mean()) < 0.35 * np.ptp(xs)) & (np.abs(ys - ys.mean()) < 0.35 * np.ptp(ys))
    pick = int(rng.integers(inner.sum()))
    centre = np.array([xs[inner][pick], ys[inner][pick], z0], dtype=np.float32)
    radii = rng.uniform(6.0, 11.0, size=3).astype(np.float32)  # voxels (2 mm): radius 12-22 mm
    # the ellipsoid's radius r(x, y, z), from one term per axis: ((x - cx) / rx)² + ((y - cy) / ry)² + ...
    terms = [
        ((torch.arange(n, dtype=torch.float32) - float(c)) / float(r)) ** 2
        for n, c, r in zip(volume.shape, centre, radii, strict=True)
    ]
    r = (terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]).sqrt_()
    inside_brain = _box_mean((volume > 0.15).float())
    mask = torch.sigmoid((1.0 - r) * 6.0) * inside_brain  # a tumour stays inside the brain
    level = float(rng.uniform(1.25, 1.5) if rng.random() < 0.6 else rng.uniform(0.15, 0.35))
    texture = _smooth_field(torch.randn(1, 6, 6, 6, generator=gen), volume.shape, align_corners=False)[..., 0]
    lesion = level * (1.0 + 0.12 * texture)
    return volume * (1.0 - mask) + lesion * mask


def _box_mean(volume):
    """The mean over each voxel's 3×3×3 neighbourhood, zeros outside (``F.avg_pool3d(v, 3, 1, 1)``), one axis at a
    time."""
    for axis in range(3):
        n = volume.shape[axis]
        summed = volume.clone()
        summed.narrow(axis, 1, n - 1).add_(volume.narrow(axis, 0, n - 1))
        summed.narrow(axis, 0, n - 1).add_(volume.narrow(axis, 1, n - 1))
        volume = summed
    return volume / 27.0


def _write_patient(args: tuple[DemoPatient, int, Path]) -> None:
    patient, seed, root = args
    data, affine = synthesize_volume(patient, seed)
    stored, stored_affine = data, affine
    if patient.flip_storage:  # stored radiologically (x flipped): same world geometry, other voxel order
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        stored, stored_affine = data[::-1], affine @ flip
    write_nifti(root / "nifti" / f"{patient.patient_id}.nii.gz", stored, stored_affine, dtype=np.int16)
    if patient.dicom:
        write_dicom_series(
            root / "dicom" / patient.patient_id, data, affine, patient, multiframe=patient.dicom == "multi"
        )


def make_demo_cohort(
    out: Path,
    *,
    patients: int = 1000,
    seed: int = 0,
    workers: int = 1,
    dicom_fraction: float = 0.2,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[DemoPatient]:
    """Write the demo cohort to ``out`` atomically (temp dir + rename). Returns the plan."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise Conflict(f"{out} already exists; choose a new --out or pass --force")
    plan = plan_patients(patients, seed, dicom_fraction)
    load_template()  # fail fast (and warm the cache before forking workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "nifti").mkdir()
        (tmp / "dicom").mkdir()
        jobs = [(p, seed, tmp) for p in plan]
        if workers > 1:
            with worker_pool(workers) as pool:
                for _ in pool.map(_write_patient, jobs, chunksize=8):
                    if progress:
                        progress(1)
        else:
            for job in jobs:
                _write_patient(job)
                if progress:
                    progress(1)
        with (tmp / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient_id", "label", "age", "sex"])
            for p in plan:
                writer.writerow([p.patient_id, p.label, p.age, p.sex])
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


# ------------------------------------------------------------------------------------------- DICOM
def write_dicom_series(
    folder: Path, data: np.ndarray, affine: np.ndarray, patient: DemoPatient, *, multiframe: bool
) -> None:
    """Write ``data`` (int16 ``[X, Y, Z]``, RAS ``affine``) as an MR DICOM series carrying fake PHI."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    orientation = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
    pixel_spacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # (between rows = j, between columns = i)
    positions = [lps[:3, 3] + k * lps[:3, 2] for k in range(data.shape[2])]
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()

    def base(sop_class: str, sop_uid: str) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.Modality = "MR"
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.PatientSex = patient.sex
        ds.PatientAge = f"{patient.age:03d}Y"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.study_date
        ds.StudyTime = "101500"
        ds.AccessionNumber = patient.accession
        ds.InstitutionName = patient.institution
        ds.InstitutionAddress = "12 HARBOUR ROAD, SPRINGFIELD"
        ds.ReferringPhysicianName = patient.physician
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.StudyID = 3, patient.accession[-6:]
        ds.SeriesDescription = "T1 MPRAGE AX"
        ds.BurnedInAnnotation = "NO"
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", f"{patient.patient_id} {patient.name}")
        block.add_new(0x02, "LO", f"DOB {patient.birth_date} ACC {patient.accession}")
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        return ds

    if not multiframe:
        for k in range(data.shape[2]):
            ds = base(MRImageStorage, generate_uid())
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = pixel_spacing
            ds.SliceThickness = f"{spacing[2]:.6f}"
            ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
            ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()  # (rows=j, cols=i)
            ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
        return

    ds = base(EnhancedMRImageStorage, generate_uid())
    ds.InstanceNumber = 1
    ds.NumberOfFrames = int(data.shape[2])
    shared = Dataset()
    measures, plane_orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = pixel_spacing, f"{spacing[2]:.6f}"
    plane_orientation.ImageOrientationPatient = orientation
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "1", "0", "US"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane_orientation]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(data.shape[2]):
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(data.transpose(2, 1, 0)).tobytes()  # (frames, rows, cols)
    ds.save_as(folder / "MF0001.dcm", enforce_file_format=True)
