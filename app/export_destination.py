"""Where an export is written: its partial directory beside OUT, and the refusals about OUT that need no model
(the CLI gives them before it loads one; :func:`app.pipeline.build_cohort` gives them too)."""

from __future__ import annotations

from pathlib import Path

from generators.errors import Conflict


def partial_dir(out: Path) -> Path:
    """The hidden directory an export of ``out`` is built in; renamed to ``out`` when complete."""
    return out.parent / f".{out.name}.partial"


def check_destination(out: Path, resume: bool) -> None:
    """Refuse an ``out`` that exists, or an unfinished export of it unless resuming."""
    if out.exists():
        raise Conflict(f"{out} already exists; choose a new output directory")
    unfinished = partial_dir(out)
    if unfinished.exists() and not resume:
        raise Conflict(f"an unfinished export exists at {unfinished}; pass --resume to continue it (or delete it)")
