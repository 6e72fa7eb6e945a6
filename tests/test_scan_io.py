"""Readers on real files: NIfTI round trip, DICOM single/multi-frame, corrupt inputs, MedMNIST npz."""

from pathlib import Path

import numpy as np
import pytest

from generators.errors import InvalidInput
from train.demo_cohort import plan_patients, write_dicom_series
from train.preprocess import axial_slices, isotropic_volume, resize_images
from train.scan_io import read_dicom_series, read_medmnist, read_nifti, scan_from_display, write_nifti


def oblique_affine() -> np.ndarray:
    """LPS-stored (x and y flipped), anisotropic voxels, a 90° in-plane axis swap and an offset."""
    affine = np.zeros((4, 4))
    affine[0, 1] = -1.5  # voxel axis 1 runs to the Left
    affine[1, 0] = -0.8  # voxel axis 0 runs Posterior
    affine[2, 2] = 3.0
    affine[:3, 3] = [40.0, 60.0, -20.0]
    affine[3, 3] = 1.0
    return affine


def test_nifti_round_trip_with_non_identity_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    write_nifti(path, data, oblique_affine())
    scan = read_nifti(path)
    # canonical RAS: axis order and signs change, world coordinates of every voxel do not
    assert scan.data.shape == (5, 6, 4)
    assert scan.spacing == pytest.approx((1.5, 0.8, 3.0))
    assert np.all(np.diag(scan.affine)[:3] > 0)
    for ijk in [(0, 0, 0), (4, 5, 3), (2, 1, 2)]:
        world = scan.affine @ np.array([*ijk, 1.0])
        original = np.linalg.solve(oblique_affine(), world)[:3].round().astype(int)
        assert scan.data[ijk] == pytest.approx(data[tuple(original)])
    assert "spacing=(1.50, 0.80, 3.00)" in repr(scan)


@pytest.mark.parametrize("content", [b"", b"not a nifti at all" * 10, b"\x5c\x01\x00\x00" + b"\x00" * 400])
def test_corrupt_nifti_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.nii"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match="NIfTI"):
        read_nifti(path)


def test_truncated_gzip_nifti(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    write_nifti(good, np.ones((8, 8, 8)), np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InvalidInput):
        read_nifti(bad)


def test_nan_and_wrong_dimensionality_rejected(tmp_path: Path) -> None:
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    write_nifti(tmp_path / "nan.nii", nan, np.eye(4))
    with pytest.raises(InvalidInput, match="NaN"):
        read_nifti(tmp_path / "nan.nii")
    write_nifti(tmp_path / "4d.nii", np.ones((4, 4, 4, 3)), np.eye(4))
    with pytest.raises(InvalidInput, match="3-D"):
        read_nifti(tmp_path / "4d.nii")


@pytest.mark.parametrize("multiframe", [False, True])
def test_dicom_series_matches_volume_and_geometry(tmp_path: Path, multiframe: bool) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 2000, size=(7, 9, 5)).astype(np.int16)
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    patient = plan_patients(2, seed=0)[0]
    write_dicom_series(tmp_path / "series", data, affine, patient, multiframe=multiframe)
    series = read_dicom_series(tmp_path / "series")
    assert series.patient_id == patient.patient_id
    assert series.n_files == (1 if multiframe else 5)
    np.testing.assert_allclose(series.scan.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(series.scan.data, data.astype(np.float32))


def test_dicom_slices_shuffled_on_disk_are_sorted_by_position(tmp_path: Path) -> None:
    data = np.arange(4 * 4 * 6, dtype=np.int16).reshape(4, 4, 6)
    write_dicom_series(tmp_path / "s", data, np.eye(4), plan_patients(2, seed=0)[0], multiframe=False)
    files = sorted((tmp_path / "s").iterdir())
    for i, f in enumerate(files):  # names no longer follow slice order
        f.rename(f.with_name(f"X{(i * 7) % 6}.dcm"))
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").scan.data, data)


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path) -> None:
    import pydicom

    write_dicom_series(tmp_path / "s", np.ones((4, 4, 3), np.int16), np.eye(4), plan_patients(2, 0)[0], multiframe=True)
    path = next((tmp_path / "s").iterdir())
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path)
    with pytest.raises(InvalidInput, match="BurnedInAnnotation"):
        read_dicom_series(tmp_path / "s")
    assert read_dicom_series(tmp_path / "s", allow_burned_in=True).scan.data.shape == (4, 4, 3)


def test_undecodable_transfer_syntax_is_reported(tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    write_dicom_series(tmp_path / "s", np.ones((4, 4, 3), np.int16), np.eye(4), plan_patients(2, 0)[0], multiframe=True)
    path = next((tmp_path / "s").iterdir())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01garbage"] * 3)
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidInput, match="transfer syntax"):
        read_dicom_series(tmp_path / "s")


def test_corrupt_dicom_file(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(InvalidInput):
        read_dicom_series(folder)


def test_medmnist_npz_2d_and_3d(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "organmnist.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 3, (5, 1)),
        test_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 3, (2, 1)),
    )
    items = list(read_medmnist(path))
    assert [i.key for i in items][:2] == ["test-000000", "test-000001"]
    assert len(items) == 7 and all(i.pixels.shape == (28, 28) for i in items)
    # a display-ordered image survives the RAS round trip through axial slicing unchanged (up to scaling)
    image = items[0].pixels
    slab = axial_slices(scan_from_display(image), n_slices=1, size=28)
    assert np.corrcoef(slab.images[0, 0].ravel(), image.ravel())[0, 1] > 0.99

    vol = tmp_path / "nodulemnist3d.npz"
    np.savez(vol, val_images=rng.random((2, 28, 28, 28)), val_labels=np.array([[0], [1]]))
    assert [i.pixels.shape for i in read_medmnist(vol)] == [(28, 28, 28)] * 2

    bad = tmp_path / "other.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(InvalidInput, match="MedMNIST"):
        list(read_medmnist(bad))


def test_axial_slices_keep_aspect_and_range() -> None:
    data = np.zeros((40, 20, 9), np.float32)  # 40 x 20 voxels of 1 x 2 mm: a 40 x 40 mm square FOV
    data[10:30, 5:15, :] = 100.0
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    slab = axial_slices(nib_scan(data, affine), n_slices=3, size=16)
    assert slab.images.shape == (3, 1, 16, 16)
    assert slab.images.min() >= -1.0 and slab.images.max() <= 1.0
    assert slab.spacing == pytest.approx((2.5, 2.5, 3.0))
    assert list(slab.positions) == [-1, 0, 1]
    bright = slab.images[1, 0] > 0
    rows, cols = np.nonzero(bright)
    assert 7 <= np.ptp(rows) + 1 <= 9 and 7 <= np.ptp(cols) + 1 <= 9  # a 20 x 20 mm square stays square


def nib_scan(data: np.ndarray, affine: np.ndarray):
    from train.scan_io import Scan

    return Scan(data, affine)


def test_blank_scan_rejected() -> None:
    with pytest.raises(InvalidInput, match="blank"):
        axial_slices(nib_scan(np.zeros((8, 8, 8), np.float32), np.eye(4)), n_slices=2, size=8)


def test_slice_orientation_anterior_top_right_on_right() -> None:
    """Rows run anterior→posterior, columns the patient's left→right (documented convention)."""
    data = np.zeros((16, 16, 3), np.float32)
    data[12:15, 12:15, :] = 1.0  # Right (high i) and Anterior (high j) in RAS voxel order
    image = axial_slices(nib_scan(data, np.eye(4)), n_slices=1, size=16).images[0, 0]
    rows, cols = np.nonzero(image > 0)
    assert rows.max() < 6 and cols.min() > 10  # top of the image, right-hand side


def test_volume_orientation_and_isotropic_grid() -> None:
    """A volume is [D, H, W]: depth inferior→superior, rows anterior→posterior, columns left→right; a
    non-isotropic, non-cubic field of view keeps its proportions on the isotropic grid."""
    affine = np.diag([2.0, 1.0, 4.0, 1.0])  # 20 x 40 x 10 voxels of 2 x 1 x 4 mm: a 40 mm cube
    right_anterior_superior = np.zeros((20, 40, 10), np.float32)
    right_anterior_superior[15:19, 30:38, 7:9] = 1.0  # high i, j, k in RAS voxel order: a 8 x 8 x 8 mm block
    slab = isotropic_volume(nib_scan(right_anterior_superior, affine), size=16)
    assert slab.images.shape == (1, 1, 16, 16, 16) and list(slab.positions) == [0]
    assert slab.spacing == pytest.approx((2.5, 2.5, 2.5))
    volume = slab.images[0, 0]
    assert volume.min() >= -1.0 and volume.max() <= 1.0
    depth, rows, cols = np.nonzero(volume > 0)
    assert depth.min() > 10 and rows.max() < 6 and cols.min() > 10  # superior, anterior (top), right
    assert all(2 <= np.ptp(axis) + 1 <= 5 for axis in (depth, rows, cols))  # 8 mm ≈ 3.2 voxels on every axis

    left_posterior_inferior = np.zeros((20, 40, 10), np.float32)
    left_posterior_inferior[1:5, 2:10, 1:3] = 1.0
    volume = isotropic_volume(nib_scan(left_posterior_inferior, affine), size=16).images[0, 0]
    depth, rows, cols = np.nonzero(volume > 0)
    assert depth.max() < 6 and rows.min() > 10 and cols.max() < 6  # inferior, posterior (bottom), left


def test_resize_images_takes_slices_and_volumes() -> None:
    slices = np.random.default_rng(0).uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    volumes = np.random.default_rng(1).uniform(-1, 1, (2, 1, 16, 16, 16)).astype(np.float32)
    assert tuple(resize_images(slices, 8).shape) == (3, 1, 8, 8)
    small = resize_images(volumes, 8)
    assert tuple(small.shape) == (2, 1, 8, 8, 8)
    # shrinking a volume averages 2 x 2 x 2 blocks (no aliasing)
    np.testing.assert_allclose(small[0, 0, 0, 0, 0], volumes[0, 0, :2, :2, :2].mean(), atol=1e-6)
    assert tuple(resize_images(volumes, 20).shape) == (2, 1, 20, 20, 20)
    with pytest.raises(InvalidInput, match="shape"):
        resize_images(np.zeros((2, 16, 16), np.float32), 8)
