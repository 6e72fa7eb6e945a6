"""Everything a released dataset contains on disk: sample files, manifests, the privacy report, the README.

A dataset directory::

    images/<label>/<label>-<index>.nii.gz   one accepted sample (float32 in [-1, 1], RAS affine, card spacing)
    previews/<label>/<label>-<index>.png    optional 8-bit previews (a volume: three orthogonal mid-slices)
    cohort.npz                              optional: images [N, 1, H, W], labels, seeds
    manifest.json, manifest.csv             file, label, index, seed, model id (nothing from the filter)
    datalist.json                           MONAI-style datalist
    privacy_report.json                     ε/δ/accountant/privacy unit, the filter's public summary, counts
    README.md                               dataset card: synthetic, how it was made
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from generators.base import preview_panel
from generators.card import ModelCard
from privacy_filters import public_summary
from train.scan_io import write_nifti

FORMATS = ("nifti", "png", "npz")


def sample_name(label: str, index: int) -> str:
    return f"{label}-{index:06d}"


def display_to_ras(image: np.ndarray) -> np.ndarray:
    """A sample in display order → RAS+ voxel order.

    ``[H, W]``: an axial slice, rows anterior→posterior, columns patient left→right → ``[W, H, 1]``.
    ``[D, H, W]``: a volume of such slices stacked inferior→superior → ``[W, H, D]``.
    """
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"a sample is [H, W] or [D, H, W], got shape {image.shape}")
    return np.ascontiguousarray(image[:, ::-1, :].transpose(2, 1, 0))


def slice_affine(spacing_mm: list[float]) -> np.ndarray:
    """Voxel → world for a sample written by :func:`display_to_ras`: ``(row_mm, col_mm, slice_mm)`` spacing."""
    row_mm, col_mm, slice_mm = spacing_mm
    return np.diag([col_mm, row_mm, slice_mm, 1.0])


def preview_pixels(image: np.ndarray) -> np.ndarray:
    """8-bit preview of a slice ``[H, W]`` or a volume ``[D, H, W]`` (:func:`generators.base.preview_panel`)."""
    return ((np.clip(preview_panel(image), -1, 1) + 1.0) * 127.5).round().astype(np.uint8)


def _replace_into(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sample(
    root: Path, image: np.ndarray, label: str, index: int, formats: tuple[str, ...], spacing_mm: list[float]
) -> str:
    """Write one accepted sample ``[1, H, W]`` or ``[1, D, H, W]``; returns its NIfTI path relative to ``root``."""
    name = sample_name(label, index)
    relative = f"images/{label}/{name}.nii.gz"
    if "nifti" in formats:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.tmp.nii.gz")  # nibabel picks the format from the suffix
        write_nifti(tmp, display_to_ras(image[0]), slice_affine(spacing_mm))  # a slice is a 1-voxel-thick volume
        os.replace(tmp, target)
    if "png" in formats:
        from PIL import Image

        pixels = preview_pixels(image[0])
        _replace_into(
            root / f"previews/{label}/{name}.png", lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG")
        )
    return relative


def write_text(path: Path, text: str) -> None:
    _replace_into(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_documents(
    root: Path,
    *,
    samples: list[dict],
    card: ModelCard,
    calibration: dict,
    counts: dict,
    request: dict,
    model_id: str,
) -> dict:
    """Manifest (JSON + CSV), MONAI datalist, privacy report and README; returns the manifest."""
    private = card.dp
    manifest = {
        "dataset": {
            "synthetic": True,
            "private": private,
            "model_id": model_id,
            "n_samples": len(samples),
            "labels": card.labels,
            "generator": card.generator,
            "image_size": card.image_size,
            "image_shape": list(card.image_shape),
            "voxel_spacing_mm": card.voxel_spacing_mm,
            "request": request,
        },
        "samples": samples,
    }
    write_json(root / "manifest.json", manifest)
    buffer = io.StringIO()
    columns = ["file", "label", "index", "seed", "model_id"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(samples)
    write_text(root / "manifest.csv", buffer.getvalue())
    write_json(
        root / "datalist.json",
        {
            "description": "synthetic cohort (MONAI-style datalist)",
            "labels": card.labels,
            "training": [{"image": s["file"], "label": card.labels[s["label"]]} for s in samples],
        },
    )
    write_json(root / "privacy_report.json", privacy_report(card=card, calibration=calibration, counts=counts))
    write_text(root / "README.md", dataset_readme(card=card, calibration=calibration, counts=counts, model_id=model_id))
    return manifest


def privacy_report(*, card: ModelCard, calibration: dict, counts: dict) -> dict:
    """What was guaranteed, in plain numbers. Never contains paths, neighbours, scores, rejection counts,
    exact private counts or training data."""
    private = card.dp
    return {
        "private": private,
        "warning": None if private else "NOT PRIVATE: the generating model was trained without differential privacy.",
        "differential_privacy": {
            "privacy_unit": card.privacy_unit,
            "neighbouring_relation": card.neighbouring_relation,
            "epsilon": card.epsilon,
            "delta": card.delta,
            "accountant": card.accountant,
            "noise_multiplier": card.noise_multiplier,
            "max_grad_norm": card.max_grad_norm,
            "sample_rate": card.sample_rate,
            "steps": card.steps,
            "patients_estimate": card.patients_estimate,
            "target_epsilon_met": card.target_epsilon_met,
            "statement": card.statement,
            "public_pretraining": card.public_pretraining,
        },
        "memorization_filter": public_summary(calibration),
        "what_holds": WHAT_HOLDS if private else "Nothing: the model was trained without differential privacy.",
        "counts": counts,
    }


WHAT_HOLDS = (
    "Differential privacy bounds what the model, and anything generated from it, reveals about any one training "
    "patient by (epsilon, delta). The memorization filter then removed generated images that sat too close to a "
    "training image; that selection reads private data, so it is NOT covered by epsilon, and the held-out "
    "patients who calibrate the filter are not protected by epsilon. Nothing about the filter's decisions "
    "(scores, distances, attempts, rejection counts) is published."
)


def dataset_readme(*, card: ModelCard, calibration: dict, counts: dict, model_id: str) -> str:
    private = card.dp
    if private:
        estimate = (card.patients_estimate or {}).get("value")
        guarantee = (
            f"The generating model was trained with differential privacy where the unit of privacy is the "
            f"**{card.privacy_unit}**: (ε = {card.epsilon:.3g}, δ = {card.delta:g}), "
            f"{card.accountant} accountant, add/remove relation, about {estimate} training "
            f"{card.privacy_unit}s (a differentially private count). "
            "Generating these samples spent no additional privacy budget."
        )
    else:
        guarantee = "**NOT PRIVATE.** The generating model was trained WITHOUT differential privacy."
    summary = public_summary(calibration)
    kind = "axial slices" if card.spatial_dims == 2 else "volumes"
    per_label = ", ".join(f"{label}: {n}" for label, n in counts["per_label"].items())
    return f"""# Synthetic imaging cohort

**Every image in this dataset is synthetic.** None is a scan of a real person. They were generated by a
class-conditional generative model (`{model_id}`, kind {card.generator}) and checked one by one by a
memorization filter before release.

## Privacy
{guarantee}

Memorization filter (defence in depth, **not** part of the differential-privacy guarantee): each generated
image was compared with the training images and rejected when, allowing for small shifts, flips and contrast
changes, it was closer to one of them than {summary.get("quantile", 0.05):.0%} of real held-out patients come;
rejected images were regenerated. Every image here passed it. How many were rejected, and any score or
distance, is not published: those numbers are computed from the training data. The filter catches copies and
near-copies of training images; what else a sample may reveal is bounded by ε alone.

## Contents
{counts["samples"]} samples ({per_label}), {" × ".join(map(str, card.image_shape))} {kind}, voxel
spacing {", ".join(f"{v:.3g}" for v in card.voxel_spacing_mm)} mm, intensities scaled to [-1, 1].
`manifest.csv` lists every file with its label, index and seed. `privacy_report.json` has the numbers above.
The operator of the service can regenerate a sample's pixels from its seed (seeds are keyed with a server
secret).
"""
