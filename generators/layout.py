"""Where everything in a model bundle lives, defined once.

A bundle is a directory with a public part and a private part::

    MODEL_DIR/model_card.json       the public card (written last: a directory without it is not a bundle)
    MODEL_DIR/...                   the generator's weights and configuration (its class decides)
    MODEL_DIR/samples_<label>.png   sample grids written at the end of training
    MODEL_DIR/private/              0700, never served: training record, checkpoint, filter, calibration, seed key

Only the card, the weights and the sample grids may leave the server; ``private/`` holds what was computed
from training data.
"""

from __future__ import annotations

import os
from pathlib import Path

CARD_FILE = "model_card.json"
PRIVATE_DIR = "private"


class BundleLayout:
    """Paths of one bundle."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def card(self) -> Path:
        return self.root / CARD_FILE

    @property
    def private(self) -> Path:
        return self.root / PRIVATE_DIR

    @property
    def training_record(self) -> Path:
        return self.private / "training_record.json"

    @property
    def checkpoint(self) -> Path:
        return self.private / "checkpoint.pt"

    @property
    def filter_dir(self) -> Path:
        return self.private / "filter"

    @property
    def calibration(self) -> Path:
        return self.private / "calibration.json"

    @property
    def seed_key(self) -> Path:
        return self.private / "seed.key"

    def sample_grid(self, label: str) -> Path:
        return self.root / f"samples_{label}.png"

    def make_private(self) -> Path:
        """Create ``private/`` (0700) and return it."""
        self.private.mkdir(parents=True, exist_ok=True)
        os.chmod(self.private, 0o700)
        return self.private
