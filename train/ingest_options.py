"""What an ingestion run is asked to do (the ``ingest`` flags) and the checks that need no scan: light, so the CLI
refuses a bad request before it imports the scan readers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from generators.errors import Conflict, InvalidInput
from train.store import DEFAULT_STORE_BUDGET

MAX_VOLUME_SIZE = 128  # --dims 3: 128³ float32 is 8 MiB a volume
LINK_MODES = ("auto", "patient-id", "folder", "stem")  # auto: DICOM PatientID, then the DICOM folder name
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
LABEL_RULE = "label names must be 1-64 letters, digits, '_', '.', '+' or '-' and start with a letter or digit"
MIN_LABEL_PATIENTS = 20


@dataclass(frozen=True)
class IngestOptions:
    """Knobs of one ingestion run (CLI flags)."""

    size: int = 64
    slices: int = 8
    dims: int = 2  # 2: axial slices; 3: whole volumes on an isotropic grid
    keep_faces: bool = False  # --dims 3: store head volumes as they are (brain-extracted or not a head)
    deface: bool = False  # remove the face of every scan before it is sliced or resampled (2-D and 3-D)
    link_by: str = "auto"  # how a scan finds its labels-file row (LINK_MODES)
    allow_2d: bool = False  # also read single-frame US / SC / OT images without geometry as 2-D images
    holdout: float = 0.2
    labels: tuple[str, ...] = ()  # the label set the operator declares (models publish exactly these)
    min_label_patients: int = MIN_LABEL_PATIENTS  # a declared label held by fewer patients is refused
    allow_burned_in: bool = False
    workers: int = 1
    overwrite: bool = False
    reset_budget: bool = False  # --force: start the replaced store's privacy ledger afresh (recorded in it)
    store_budget: float = DEFAULT_STORE_BUDGET


def check_request(options: IngestOptions, out: Path) -> None:
    """Refuse bad options, and an existing ``out`` without ``--force``, before a scan is read (or imported)."""
    if not options.labels:
        raise InvalidInput(
            "declare the labels a model trained from this store may publish, e.g. --declare-labels healthy,lesion: "
            "the label set is the operator's declaration, never read off the patients"
        )
    bad = [label for label in options.labels if not LABEL_PATTERN.fullmatch(label)]
    if bad or len(set(options.labels)) != len(options.labels):
        raise InvalidInput(f"declared labels {list(options.labels)} must be distinct; {LABEL_RULE}")
    if options.min_label_patients < 1:
        raise InvalidInput(f"--min-label-patients must be at least 1, got {options.min_label_patients}")
    if options.reset_budget and not options.overwrite:
        raise InvalidInput("--reset-budget only applies when --force replaces an existing store")
    if options.size < 8 or options.size > 1024:
        raise InvalidInput(f"--size must be between 8 and 1024, got {options.size}")
    if options.dims not in (2, 3):
        raise InvalidInput(f"--dims must be 2 (axial slices) or 3 (volumes), got {options.dims}")
    if options.dims == 3 and options.size > MAX_VOLUME_SIZE:
        raise InvalidInput(f"--size must be at most {MAX_VOLUME_SIZE} with --dims 3, got {options.size}")
    if options.link_by not in LINK_MODES:
        raise InvalidInput(f"--link-by must be one of {list(LINK_MODES)}, got {options.link_by!r}")
    if options.deface and options.keep_faces:
        raise InvalidInput("--deface and --keep-faces contradict each other: choose one")
    if options.dims == 3 and not (options.keep_faces or options.deface):
        raise InvalidInput(
            "--dims 3 stores whole volumes, and a head volume carries the patient's face: pass --deface to "
            "remove it, or --keep-faces to confirm the volumes carry none (brain-extracted or non-head volumes)"
        )
    if options.slices < 1:
        raise InvalidInput(f"--slices must be at least 1, got {options.slices}")
    if not 0.0 <= options.holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1), got {options.holdout}")
    if not options.store_budget > 0:
        raise InvalidInput(f"--store-budget must be a positive ε, got {options.store_budget}")
    if out.exists() and not options.overwrite:
        raise Conflict(f"{out} already exists; choose a new --out or pass --force to replace it")
