"""``ingest --deface`` on heads that carry a face: the face is gone, the rest of the head is untouched, a scan that
cannot be defaced is skipped, never stored with its face."""

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ingest_options
from scipy.ndimage import affine_transform, binary_erosion

from generators.errors import InvalidInput
from train.deface import MIN_FIT, deface
from train.ingest import ingest
from train.scan_io import Scan, read_nifti

SHAPE = (112, 160, 160)  # 1.5 mm voxels: the whole head of the template


def _template() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    data = Path(next(iter(importlib.util.find_spec("pydeface").submodule_search_locations))) / "data"
    return nib.load(data / "mean_reg2mean.nii.gz"), nib.load(data / "facemask.nii.gz")


def synthetic_head(nod_degrees: float, shift_mm: tuple[float, float, float], seed: int) -> tuple[Scan, np.ndarray]:
    """A head with a face (the public template of heads, moved by a known nod and shift, on a 1.5 mm grid, with its
    intensities rescaled and noised) and where its face truly is: ``(scan, face [X, Y, Z] bool)``."""
    head, mask = _template()
    angle = np.deg2rad(nod_degrees)
    motion = np.eye(4)
    motion[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    motion[:3, 3] = shift_mm
    grid = np.diag([1.5, 1.5, 1.5, 1.0])
    grid[:3, 3] = head.affine[:3, 3] + np.array([-3.0, -10.0, 0.0])
    to_template = np.linalg.inv(head.affine) @ np.linalg.inv(motion) @ grid  # scan voxel -> template voxel
    resample = {"matrix": to_template[:3, :3], "offset": to_template[:3, 3], "output_shape": SHAPE}
    data = affine_transform(np.asarray(head.dataobj, np.float32), order=1, **resample)
    face = affine_transform(np.asarray(mask.dataobj, np.float32), order=0, cval=1.0, **resample) < 0.5
    rng = np.random.default_rng(seed)
    data = data * rng.uniform(2, 4) + rng.normal(0, 15, SHAPE)
    return Scan(np.clip(data, 0, None).astype(np.float32), grid), face


def test_the_face_is_removed_and_the_rest_of_the_head_is_kept() -> None:
    scan, face = synthetic_head(nod_degrees=12.0, shift_mm=(4.0, 10.0, -8.0), seed=0)
    result = deface(scan)
    assert result.fit >= MIN_FIT
    removed = result.scan.data == result.scan.data.min()
    visible = scan.data > 0.2 * np.percentile(scan.data, 99)  # tissue, not air
    face_tissue = face & visible
    assert face_tissue.sum() > 20_000  # the synthetic head does carry a face
    assert removed[face_tissue].mean() >= 0.97
    far_from_face = binary_erosion(~face, iterations=4) & visible  # 6 mm away from the mask's edge
    assert (result.scan.data[far_from_face] == scan.data[far_from_face]).mean() >= 0.99
    assert result.scan.affine.tolist() == scan.affine.tolist()


def test_voxels_outside_the_template_field_of_view_are_removed() -> None:
    """A scan with a field of view larger than the template's (padded by 60 mm on every side, with tissue-like
    values there): whatever lies outside the registered template is removed, as pydeface does, not kept."""
    scan, _ = synthetic_head(nod_degrees=0.0, shift_mm=(0.0, 0.0, 0.0), seed=3)
    pad = 40  # voxels of 1.5 mm
    data = np.pad(scan.data, pad, constant_values=0.0)
    rng = np.random.default_rng(4)
    outside = np.ones(data.shape, bool)
    outside[pad:-pad, pad:-pad, pad:-pad] = False
    data[outside] = rng.uniform(200, 400, int(outside.sum()))  # bright "tissue" beyond the template's reach
    affine = scan.affine.copy()
    affine[:3, 3] -= 1.5 * pad
    result = deface(Scan(data.astype(np.float32), affine))
    beyond = result.scan.data[outside]
    assert (beyond == result.scan.data.min()).mean() >= 0.9, "voxels outside the template's field of view were kept"


def test_a_brain_extracted_volume_is_refused_not_stored_with_a_guess(demo_raw) -> None:
    raw, _ = demo_raw
    brain = read_nifti(sorted((raw / "nifti").glob("*.nii*"))[0])
    with pytest.raises(InvalidInput, match="--keep-faces"):
        deface(brain)


def test_ingest_deface_stores_defaced_volumes_and_reports_them(demo_raw, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, nod in enumerate((-6.0, 8.0)):
        scan, _ = synthetic_head(nod_degrees=nod, shift_mm=(0.0, 5.0 * i, 0.0), seed=i)
        flipped = nib.as_closest_canonical(nib.Nifti1Image(scan.data, scan.affine))  # RAS on disk ...
        lps = flipped.as_reoriented(nib.orientations.axcodes2ornt("LPS"))  # ... stored LPS: reorientation matters
        nib.save(lps, raw / f"head{i}.nii.gz")
    demo_brain = sorted((demo_raw[0] / "nifti").glob("*.nii*"))[0]
    (raw / "brain.nii.gz").write_bytes(demo_brain.read_bytes())
    (raw / "labels.csv").write_text("patient_id,label\nhead0,a\nhead1,b\nbrain,a\n")

    with pytest.raises(InvalidInput, match="contradict"):
        ingest(
            raw, tmp_path / "x", labels_path=raw / "labels.csv", options=ingest_options(deface=True, keep_faces=True)
        )
    options = ingest_options(("a", "b"), dims=3, size=24, deface=True, holdout=0.0)
    result = ingest(raw, tmp_path / "store", labels_path=raw / "labels.csv", options=options)
    assert result.report["defaced_scans"] == 2 and "--deface" in result.report["settings"]["faces"]
    assert [s["reason"][:15] for s in result.report["skipped"]] == ["defacing failed"]
    assert result.store.n_slices == 2 and result.store.spatial_dims == 3
