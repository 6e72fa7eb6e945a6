"""Pictures for the web pages: a model's preview grid per label and a dataset sample's preview.

A model's preview is a small cohort made by the one pipeline (generate → filter → write, fixed public seed), so
every image a page shows passed the memorization filter like any released sample; it is built once per model
version under the data directory and reused. Nothing here ever reads a training image.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from app.dataset_writer import preview_pixels, ras_to_display
from app.model_registry import ServedModel
from app.pipeline import CohortRequest, build_cohort, partial_dir
from generators.errors import Conflict
from generators.layout import BundleLayout

PER_LABEL = 4
SCALE = 3  # small images upscaled (nearest) so a person can see them
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def preview_cohort(model: ServedModel, data_dir: Path, *, allow_not_private: bool) -> Path:
    """The model's preview cohort (built on first use): ``PER_LABEL`` filtered samples per label, PNG previews."""
    version = hashlib.sha256(BundleLayout(model.path).card.read_bytes()).hexdigest()[:16]
    out = Path(data_dir) / "previews" / f"{model.id}-{version}"
    with _lock(out.name):
        if not out.is_dir():
            request = CohortRequest(
                counts=dict.fromkeys(model.card.labels, PER_LABEL),
                seed=0,
                formats=("nifti", "png"),
                allow_not_private=allow_not_private,
            )
            try:
                build_cohort(model.path, request, out, resume=partial_dir(out).exists())
            except Conflict:  # another process makes it right now; its message names server paths
                raise Conflict("this model's preview is being made; reload in a moment") from None
    return out


def label_grid(model: ServedModel, label: str, data_dir: Path, *, allow_not_private: bool) -> Path:
    """One PNG row of the preview cohort's samples of ``label`` (made once, then reused)."""
    root = preview_cohort(model, data_dir, allow_not_private=allow_not_private)
    grid = root / f"grid-{label}.png"
    if not grid.is_file():
        tiles = [Image.open(p) for p in sorted((root / "previews" / label).glob("*.png"))]
        height = max(t.height for t in tiles)
        row = Image.new("L", (sum(t.width + 2 for t in tiles), height), color=0)
        x = 0
        for tile in tiles:
            row.paste(tile, (x, 0))
            x += tile.width + 2
        row = row.resize((row.width * SCALE, row.height * SCALE), Image.NEAREST)
        tmp = grid.with_suffix(".tmp.png")
        row.save(tmp, format="PNG")
        tmp.replace(grid)
    return grid


def nifti_preview_png(path: Path) -> bytes:
    """A released NIfTI sample as an 8-bit PNG: a slice as it is, a volume as three orthogonal mid-slices."""
    volume = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    pixels = preview_pixels(ras_to_display(volume))
    image = Image.fromarray(pixels)
    image = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
