"""Remove the face from a head scan before anything is stored (``ingest --deface``).

The method is pydeface's: register a whole-head template to the scan and zero the voxels that the template's face
mask covers. The template (``mean_reg2mean``, an average of heads with their faces) and the face mask come from
the ``pydeface`` package's data (installed from PyPI, nothing is downloaded at run time); the registration, which
pydeface delegates to FSL's FLIRT, is SimpleITK's here: similarity then affine, Mattes mutual information on a
regular voxel grid (no random sampling), two resolution levels, all but the finest against the template binned to
2 mm (half the time of the full template at every level, with the same fit). As pydeface does, voxels outside the
registered template's field of view are removed too: the template cannot tell whether they hold part of a face.

A registration that does not fit the head (the warped template correlates poorly with the scan: a brain-extracted
volume, a non-head scan, a failed optimisation) is refused, never stored with its face. The face mask covers the
face (nose, mouth, eyes, chin); it does NOT remove the ears.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from generators.errors import InvalidInput
from train.scan_io import Scan

METHOD = (
    "pydeface's whole-head template and face mask, registered to each scan with SimpleITK (similarity, then "
    "affine; Mattes mutual information); the face (nose, mouth, eyes, chin) is zeroed, the ears are not"
)
MIN_FIT = 0.5  # Pearson correlation of the registered template with the scan, over the head; below: refused
_LPS = np.diag([-1.0, -1.0, 1.0])  # SimpleITK's world is LPS, nibabel's RAS


@dataclass(frozen=True)
class Defaced:
    scan: Scan
    fit: float  # correlation of the registered template with the scan (≥ MIN_FIT)


def deface(scan: Scan) -> Defaced:
    """The scan with its face voxels, and every voxel outside the registered template's field of view (where
    nothing says there is no face), set to the scan's minimum.

    Raises:
        InvalidInput: the head template does not fit the scan (not a head with its face, or registration failed).
    """
    import SimpleITK as sitk

    template, coarse, face_mask = _template()
    subject = _to_sitk(scan.data, scan.affine)
    transform = _register(subject, template, coarse)
    warped = sitk.Resample(template, subject, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fit = _fit(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(subject))
    if not fit >= MIN_FIT:
        raise InvalidInput(
            f"defacing failed: the head template does not fit this scan (correlation {fit:.2f} < {MIN_FIT}); "
            "is it a head scan with its face? brain-extracted volumes need --keep-faces, not --deface"
        )
    keep = sitk.Resample(face_mask, subject, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)  # outside: 0
    keep_xyz = sitk.GetArrayFromImage(keep).transpose(2, 1, 0).astype(bool)
    data = np.where(keep_xyz, scan.data, scan.data.min()).astype(np.float32)
    return Defaced(scan=Scan(data, scan.affine.copy()), fit=float(fit))


def _register(subject, template, coarse):  # SimpleITK images -> the template→subject-grid transform
    """Similarity (subject shrunk 4x, then 2x), then affine (4x, then 2x). Every level but the last registers
    the template binned to 2 mm (``coarse``), since the metric's set-up per level scales with the moving image's
    voxels; the last level, which sets the face mask's placement, registers the full template."""
    import SimpleITK as sitk

    fixed = sitk.Cast(subject, sitk.sitkFloat32)
    similarity = sitk.CenteredTransformInitializer(
        fixed, template, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    _optimise(similarity, fixed, coarse, shrink=[4, 2], sigmas=[2.0, 1.0])
    affine = sitk.AffineTransform(3)  # starts where the similarity stage ended
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    _optimise(affine, fixed, coarse, shrink=[4], sigmas=[2.0])
    _optimise(affine, fixed, template, shrink=[2], sigmas=[1.0])
    return affine


def _optimise(transform, fixed, moving, *, shrink: list[int], sigmas: list[float]) -> None:
    """Fit ``transform`` (in place) by Mattes mutual information on a regular grid of the fixed image's voxels,
    one level per shrink factor (smoothing sigmas in voxels)."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=150, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def _fit(warped: np.ndarray, subject: np.ndarray) -> float:
    """Pearson correlation over the voxels where either image shows the head (above 10 % of its 99th pct)."""
    head = (warped > 0.1 * np.percentile(warped, 99)) | (subject > 0.1 * np.percentile(subject, 99))
    if head.sum() < 100:
        return 0.0
    a, b = warped[head].astype(np.float64), subject[head].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


@cache
def _template():  # (whole-head template, the same binned 2x2x2, face mask: 1 keep, 0 face) as SimpleITK images
    import nibabel as nib
    import SimpleITK as sitk

    spec = importlib.util.find_spec("pydeface")  # locate the package's data without importing it (nipype)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput("--deface needs the pydeface package (pip install pydeface)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    head = nib.load(data / "mean_reg2mean.nii.gz")
    mask = nib.load(data / "facemask.nii.gz")
    template = _to_sitk(np.asarray(head.dataobj, dtype=np.float32), head.affine)
    face_mask = _to_sitk((np.asarray(mask.dataobj) > 0.5).astype(np.uint8), mask.affine)
    return template, sitk.BinShrink(template, [2, 2, 2]), face_mask


def _geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction row-major, origin) in SimpleITK's LPS world from a nibabel RAS voxel→world affine
    (its rotation part: a sheared affine is approximated by its nearest orthonormal directions)."""
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    u, _, vt = np.linalg.svd(_LPS @ linear / spacing)
    return tuple(spacing.tolist()), tuple((u @ vt).ravel().tolist()), tuple((_LPS @ affine[:3, 3]).tolist())


def _to_sitk(data: np.ndarray, affine: np.ndarray):  # data [X, Y, Z] -> SimpleITK image with the same geometry
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    spacing, direction, origin = _geometry(affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image
