"""Sample files in any dimension: the NIfTI affine puts every voxel where the display convention says."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from app.dataset_writer import preview_pixels, write_sample
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
    relative = write_sample(tmp_path, image[None], "lesion", 3, ("nifti", "png"), SPACING)
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
