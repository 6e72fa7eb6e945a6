"""Where everything in a model bundle lives, defined once.

A bundle is a directory with a public part and a private part::

    MODEL_DIR/model_card.json       the public card (written last: a directory without it is not a bundle)
    MODEL_DIR/...                   the generator's weights and configuration (its class decides)
    MODEL_DIR/filter_summary.json   the memorization filter's public summary (written by calibrate)
    MODEL_DIR/private/              0700, never served: training record, checkpoint, filter, calibration, seed key,
                                    and the unfiltered sample grids written at the end of training

Only the card, the weights and the filter summary may leave the server (an API process needs nothing else:
:func:`public_parts`); ``private/`` holds what was computed from training data or was never filtered.
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

    @property
    def filter_summary(self) -> Path:
        return self.root / "filter_summary.json"

    def sample_grid(self, label: str) -> Path:
        """Unfiltered samples of ``label`` drawn at the end of training, for the operator's eyes only."""
        return self.private / f"unfiltered_samples_{label}.png"

    def public_parts(self) -> list[Path]:
        """Everything in the bundle but ``private/``: what an API process (or a public copy) may hold."""
        return sorted(p for p in self.root.iterdir() if p.name != PRIVATE_DIR)

    def make_private(self) -> Path:
        """Create ``private/`` (0700) and return it."""
        self.private.mkdir(parents=True, exist_ok=True)
        os.chmod(self.private, 0o700)
        return self.private
