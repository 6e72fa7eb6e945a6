"""Sample files in any dimension: the NIfTI affine puts every voxel where the display convention says."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from app.dataset_writer import preview_pixels, ras_to_display, write_sample
from generators.errors import InvalidInput

SPACING = [2.0, 1.5, 3.0]  # row (anterior→posterior), column (left→right), slice (inferior→superior) in mm


def marked(shape: tuple[int, ...]) -> np.ndarray:
    """Background −1 with one bright voxel at the right-anterior(-superior) corner of the display convention."""
    image = np.full(shape, -1.0, dtype=np.float32)
    image[(..., 0, shape[-1] - 1)] = 1.0  # row 0 = most anterior, last column = patient's right
    if len(shape) == 3:
        image[:-1] = -1.0  # keep the marker in the most superior slice only
    return image


@pytest.mark.parametrize("shape", [(8, 10), (6, 8, 10)], ids=["slice", "volume"])
def test_written_samples_are_ras_with_the_marker_at_the_right_anterior_superior_corner(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    image = marked(shape)
    relative = write_sample(tmp_path, image[None], "lesion", 3, ("nifti", "png"), SPACING)["file"]
    nifti = nib.load(tmp_path / relative)
    data = np.asarray(nifti.dataobj)
    assert nib.aff2axcodes(nifti.affine) == ("R", "A", "S")
    assert nifti.header.get_zooms() == pytest.approx((1.5, 2.0, 3.0))
    assert data.shape == (shape[-1], shape[-2], shape[0] if len(shape) == 3 else 1)
    world = nib.affines.apply_affine(nifti.affine, np.argwhere(data == data.max()))[0]
    corners = nib.affines.apply_affine(nifti.affine, np.array(np.meshgrid(*map(range, data.shape))).reshape(3, -1).T)
    assert np.allclose(world, corners.max(0))  # most right, most anterior, most superior
    assert np.isclose(data.sum(), image.sum())  # nothing lost or duplicated


def test_a_volume_previews_as_three_orthogonal_mid_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1, 1, size=(6, 8, 10)).astype(np.float32)
    write_sample(tmp_path, volume[None], "healthy", 0, ("nifti", "png"), SPACING)
    png = np.asarray(Image.open(tmp_path / "previews/healthy/healthy-000000.png"))
    assert png.shape == (8, 10 + 1 + 10 + 1 + 8 + 1)
    np.testing.assert_array_equal(png[:, :10], preview_pixels(volume[3]))  # axial mid-slice first
    np.testing.assert_array_equal(png[:6, 11:21], preview_pixels(volume[::-1, 4, :]))  # coronal, superior up
    with pytest.raises(InvalidInput, match="shape"):
        preview_pixels(np.zeros((2, 2, 2, 2)))


@pytest.mark.parametrize("shape", [(8, 10), (6, 8, 10)], ids=["slice", "volume"])
def test_dicom_samples_are_synthetic_unique_and_have_the_geometry_of_their_nifti(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    import pydicom
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    images = [np.clip(rng.normal(0, 0.5, size=shape), -1, 1).astype(np.float32) for _ in range(2)]
    paths = [write_sample(tmp_path, x[None], "lesion", i, ("nifti", "dicom"), SPACING) for i, x in enumerate(images)]
    uids = set()
    for path in paths:
        files = sorted((tmp_path / path["dicom"]).glob("*.dcm"))
        assert len(files) == (shape[0] if len(shape) == 3 else 1)
        for f in files:
            ds = pydicom.dcmread(f)
            assert "SYNTHETIC" in str(ds.PatientName) and ds.PatientID.startswith("SYNTHETIC")
            assert list(ds.ImageType)[-1] == "SYNTHETIC" and "SYNTHETIC" in ds.SeriesDescription
            uids.add(ds.SOPInstanceUID)
        uids.update({ds.StudyInstanceUID, ds.SeriesInstanceUID})
        # a second reader: SimpleITK (GDCM) reads the series as a volume with the NIfTI's geometry
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        dicom = sitk.DICOMOrient(reader.Execute(), "LPS")  # both in one voxel order: compare world geometry
        nifti = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / path["file"])), "LPS")
        assert dicom.GetSize() == nifti.GetSize()
        assert np.allclose(dicom.GetSpacing(), nifti.GetSpacing(), atol=1e-4)
        assert np.allclose(dicom.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
        assert np.allclose(dicom.GetDirection(), nifti.GetDirection(), atol=1e-6)
        values = sitk.GetArrayFromImage(dicom).astype(np.float64) / 4095 * 2 - 1
        assert np.allclose(values, sitk.GetArrayFromImage(nifti), atol=1.5 / 4095)  # same voxels, 12-bit
    assert len(uids) == 2 * (len(files) + 2)  # every instance, study and series UID is fresh


def test_dicom_samples_pass_a_dicom_validator(tmp_path: Path) -> None:
    """dciodvfy (Debian's dicom3tools; `.ci/run` installs it) finds no error in the MR Image IOD we write."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools): the DICOM validator check is skipped")
    volume = np.zeros((3, 8, 10), dtype=np.float32)
    path = write_sample(tmp_path, volume[None], "healthy", 0, ("nifti", "dicom"), SPACING)["dicom"]
    for f in sorted((tmp_path / path).glob("*.dcm")):
        report = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 5)])
def test_a_written_sample_reads_back_in_display_order(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """What the web pages preview from a released NIfTI is the sample as generated (asymmetric, so a flip or a
    transpose would show)."""
    image = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    paths = write_sample(tmp_path, image[None], "a", 0, ("nifti",), [2.0, 3.0, 4.0])
    volume = np.asarray(nib.load(tmp_path / paths["file"]).get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(ras_to_display(volume), image)
