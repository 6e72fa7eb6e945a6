"""Build a model's memorization filter from the cohort store it was trained on.

Everything written here is private but one file: ``MODEL_DIR/private/filter/`` (the index of training
embeddings), ``MODEL_DIR/private/calibration.json`` (the calibration record) and ``MODEL_DIR/private/seed.key``
(the server secret that keys every released sample's seed, see :func:`app.pipeline.sample_seed`) are never
served; ``MODEL_DIR/filter_summary.json`` is the filter's public summary (its rule and coarse rates), which is
all an API process reads of the filter.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from generators.atomic import write_json_atomic
from generators.base import resolve_device
from generators.card import card_exists, read_card
from generators.errors import InvalidInput
from generators.layout import BundleLayout
from privacy_filters import MemorizationFilter, public_summary
from train.preprocess import resize_split
from train.store import CohortStore


def ensure_seed_key(model_dir: Path) -> None:
    """Create the model's seed key once (kept across re-calibration, so manifests stay reproducible)."""
    path = BundleLayout(model_dir).seed_key
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))


def calibrate(
    store_path: Path,
    model_dir: Path,
    *,
    quantile: float = 0.05,
    embedding: str | None = None,
    index: str = "flat",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> dict:
    """Build, self-test and save the filter; returns the calibration record. ``embedding`` defaults to the
    views for the store's items (slices: near-copy + aligned-pyramid; volumes: the 3-D aligned pyramid).
    ``device`` (auto, cpu or cuda) is where the training images are embedded and the held-out ones re-ranked."""
    store = CohortStore.open(store_path)
    layout = BundleLayout(model_dir)
    size = store.image_size
    if card_exists(model_dir):
        card = read_card(model_dir)
        if card.spatial_dims != store.spatial_dims:
            raise InvalidInput(
                f"this {card.spatial_dims}-D model was not trained on this store of {store.spatial_dims}-D items; "
                "calibrate with the store the model was trained on"
            )
        if card.store_id and card.store_id != store.store_id:
            raise InvalidInput(
                "this model was trained on a different cohort store (store ids differ); calibrate with the "
                "store the model was trained on"
            )
        size = card.image_size  # the filter compares images at the size the model generates
    train, holdout = store.read("train"), store.read("holdout")
    if len(holdout.images) == 0:
        raise InvalidInput("the store has no held-out patients; re-ingest with --holdout > 0 to calibrate")
    filt = MemorizationFilter.build(
        resize_split(train.images, size),
        resize_split(holdout.images, size),
        quantile=quantile,
        holdout_groups=holdout.patients,
        embedding=embedding,
        index=index,
        seed=seed,
        progress=progress,
        device=resolve_device(device),
    )
    record = {**filt.record, "store_id": store.store_id}
    filt.record = record
    layout.make_private()
    filt.save(layout.filter_dir)
    ensure_seed_key(model_dir)
    write_json_atomic(layout.calibration, record)
    write_json_atomic(layout.filter_summary, public_summary(record))  # the only part an API process reads
    return record
