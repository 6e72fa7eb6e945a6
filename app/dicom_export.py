"""Synthetic samples as DICOM (``--format dicom``), encoded with pydicom.

Every sample is its own synthetic patient, study and series: a slice is one MR Image instance, a volume one
instance per axial slice (inferior→superior). UIDs are fresh for every file and derived from random UUIDs under
the ``2.25`` root (ISO/IEC 9834-8; no registered root needed). Nothing is copied from any real patient: names and
ids say SYNTHETIC, ``ImageType`` is ``DERIVED\\SECONDARY\\SYNTHETIC``, the series description and image comments
say it is synthetic, and the acquisition attributes that an MR IOD needs are the "research mode" / "none" values,
not made-up parameters. ``BodyPartExamined`` is ``HEAD`` (the cohorts synthcohort is built for; a model card does
not record anatomy yet). dciodvfy (dicom3tools) finds no error in these files.

Geometry matches the NIfTI of the same sample (:func:`app.dataset_writer.display_to_ras`): display columns run
along patient +x (RAS), display rows anterior→posterior, slices inferior→superior; in DICOM's LPS world that is
``ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from generators.atomic import write_atomic

MAX_VALUE = 4095  # 12-bit unsigned pixels: [-1, 1] → [0, 4095]
ORIENTATION = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def write_dicom_series(
    directory: Path,
    image: np.ndarray,
    spacing_mm: list[float],
    *,
    label: str,
    name: str,
    description: str,
    covariates: dict | None = None,
    released_at: str | None = None,
) -> list[str]:
    """Write one sample ``[1, H, W]`` or ``[1, D, H, W]`` (values in [-1, 1]) as a DICOM series in ``directory``;
    returns the file names. ``covariates`` (requested age and sex) fill PatientAge and PatientSex. ``released_at``
    (ISO time; default now) is the study and content date and time: one value for a whole dataset, so no file
    shows when its sample was drawn. Each file is written atomically (:func:`generators.atomic.write_atomic`)."""
    from pydicom.uid import generate_uid

    volume = image[0] if image.ndim == 4 else image[0][None]  # [D, H, W]
    pixels = np.rint((np.clip(volume, -1.0, 1.0) + 1.0) * (MAX_VALUE / 2)).astype(np.uint16)
    row_mm, col_mm, slice_mm = (float(v) for v in spacing_mm)
    depth, height = pixels.shape[0], pixels.shape[1]
    series = {
        "StudyInstanceUID": generate_uid(prefix=None),
        "SeriesInstanceUID": generate_uid(prefix=None),
        "FrameOfReferenceUID": generate_uid(prefix=None),
    }
    when = datetime.fromisoformat(released_at).astimezone(UTC) if released_at else datetime.now(UTC)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(depth):
        position = [0.0, -row_mm * (height - 1), slice_mm * k]  # RAS (0, row_mm·(H-1), z) in LPS
        dataset = _instance(
            pixels[k], series, position, row_mm, col_mm, slice_mm, depth, label, name, description, when
        )
        dataset.InstanceNumber = k + 1
        _write_covariates(dataset, covariates or {})
        file_name = f"{k + 1:04d}.dcm"
        write_atomic(directory / file_name, lambda tmp, ds=dataset: ds.save_as(tmp, enforce_file_format=True))
        names.append(file_name)
    return names


def _write_covariates(dataset, covariates: dict) -> None:
    """The requested (synthetic) sex and age where DICOM has a place for them."""
    if covariates.get("sex") in ("F", "M"):
        dataset.PatientSex = covariates["sex"]
    if covariates.get("age") is not None:
        dataset.PatientAge = f"{int(covariates['age']):03d}Y"


def _instance(pixels, series, position, row_mm, col_mm, slice_mm, depth, label, name, description, when):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = MRImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    # patient, study, series: synthetic, nothing from a real patient
    ds.PatientName = f"SYNTHETIC^{name}"
    ds.PatientID = f"SYNTHETIC-{name}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "NO"  # there never was a patient identity to remove
    ds.StudyInstanceUID = series["StudyInstanceUID"]
    ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC cohort (synthcohort)"
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "HEAD"  # an unpaired part: no Laterality
    ds.PatientPosition = "HFS"  # head first, supine: the frame the orientation above is written in
    ds.SeriesDescription = f"SYNTHETIC {label}"[:64]
    ds.Manufacturer = "synthcohort (synthetic data generator)"
    ds.ImageComments = description[:10240]
    ds.BurnedInAnnotation = "NO"
    # frame of reference and image plane: the NIfTI's geometry in LPS
    ds.FrameOfReferenceUID = series["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = ORIENTATION
    ds.ImagePositionPatient = position
    ds.PixelSpacing = [row_mm, col_mm]
    ds.SliceThickness = slice_mm
    ds.SpacingBetweenSlices = slice_mm  # what readers use as the third spacing of a single slice
    ds.SliceLocation = position[2]
    # MR image: synthetic, so the acquisition attributes say "research mode, nothing else"
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D" if depth > 1 else "2D"
    ds.EchoTime = ""
    ds.EchoTrainLength = ""
    ds.RepetitionTime = ""
    # pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
