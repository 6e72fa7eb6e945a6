"""Pictures for the web pages: a model's preview grid per label and a dataset sample's preview.

A model's preview is a small cohort made by the one pipeline (generate → filter → write, fixed public seed), so
every image a page shows passed the memorization filter like any released sample. Job workers make it (they hold
the whole bundle, filter included) once per model version under the data directory; an API process only reads
the finished grids, so it needs no bundle's private part. Nothing here ever reads a training image.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from app.dataset_writer import preview_pixels, ras_to_display
from app.export_destination import partial_dir
from app.model_registry import ServedModel
from app.pipeline import CohortRequest, build_cohort
from generators.atomic import write_atomic
from generators.layout import BundleLayout

PER_LABEL = 4
SCALE = 3  # small images upscaled (nearest) so a person can see them


def preview_dir(model: ServedModel, data_dir: Path) -> Path:
    """Where the preview of this version of the model (its card's digest) lives."""
    version = hashlib.sha256(BundleLayout(model.path).card.read_bytes()).hexdigest()[:16]
    return Path(data_dir) / "previews" / f"{model.id}-{version}"


def label_grid(model: ServedModel, label: str, data_dir: Path) -> Path | None:
    """The finished preview grid of ``label`` (``None``: no worker has made it yet)."""
    grid = preview_dir(model, data_dir) / f"grid-{label}.png"
    return grid if grid.is_file() else None


def preview_ready(model: ServedModel, data_dir: Path) -> bool:
    return all(label_grid(model, label, data_dir) is not None for label in model.card.labels)


def make_preview(model: ServedModel, data_dir: Path, *, allow_not_private: bool) -> bool:
    """Make the model's preview if it is missing and no other worker is making it; ``True`` if one was made.

    ``PER_LABEL`` filtered samples per label (PNG previews), then one grid per label; workers of several
    processes share the data directory, so a lock file decides who makes it.
    """
    out = preview_dir(model, data_dir)
    if preview_ready(model, data_dir) or model.filter_summary is None:  # uncalibrated: nothing to filter with
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another worker makes it right now
        if not out.is_dir():
            request = CohortRequest(
                counts=dict.fromkeys(model.card.labels, PER_LABEL),
                seed=0,
                formats=("nifti", "png"),
                allow_not_private=allow_not_private,
            )
            build_cohort(model.path, request, out, resume=partial_dir(out).exists())
        for label in model.card.labels:
            _write_grid(out, label)
    return True


def _write_grid(root: Path, label: str) -> None:
    """One PNG row of the preview cohort's samples of ``label``, upscaled."""
    tiles = [Image.open(p) for p in sorted((root / "previews" / label).glob("*.png"))]
    height = max(t.height for t in tiles)
    row = Image.new("L", (sum(t.width + 2 for t in tiles), height), color=0)
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + 2
    row = row.resize((row.width * SCALE, row.height * SCALE), Image.NEAREST)
    write_atomic(root / f"grid-{label}.png", lambda tmp: row.save(tmp, format="PNG"))


def nifti_preview_png(path: Path) -> bytes:
    """A released NIfTI sample as an 8-bit PNG: a slice as it is, a volume as three orthogonal mid-slices."""
    volume = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    pixels = preview_pixels(ras_to_display(volume))
    image = Image.fromarray(pixels)
    image = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
