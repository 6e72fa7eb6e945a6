"""The private cohort store: a directory of memory-mappable slices plus a pseudonymous index.

Layout (every file 0600, the directory 0700)::

    STORE/
      PRIVATE              marker: this directory holds training-derived data, never serve it
      store.json           format, spatial dims, image size, split ranges, label names, fingerprint, a random
                           store id, the privacy unit, the DP patient-count estimate N̂ and the privacy budget
      images.npy           float32 [N, 1, H, W] slices (spatial dims 2) or [N, 1, D, H, W] volumes (3) in
                           [-1, 1]; train items first, then holdout
      index.csv            one row per slice or volume: pseudonym, split, label, covariates, position, spacing
      ingest_report.json   exact counts per split/label and every skipped input with its reason
      privacy_ledger.jsonl every release computed from the patients (see ``train.ledger``)
      secret.key           HMAC key for pseudonyms (never printed or logged)

Exact counts stay in the store. What models may publish about the cohort's size is the DP estimate N̂
(the Gaussian mechanism on the training-patient count, first entry of the ledger).

A store is written into a temporary sibling directory and renamed into place when complete, so a crash
never leaves a half store and an existing store is never half-overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from generators.atomic import publish_directory
from generators.errors import Conflict, InvalidInput, NotFound
from train.accounting import COUNT_NOISE, RELATION, count_mechanism, noisy_count, public_default_delta
from train.ledger import PrivacyLedger

STORE_FORMAT = 2
SPLITS = ("train", "holdout")
SPATIAL_DIMS = (2, 3)
PRIVACY_UNITS = ("patient", "image")
DEFAULT_STORE_BUDGET = 10.0
PRIVATE_MARKER = "PRIVATE"
PRIVATE_TEXT = (
    "This directory holds training-derived medical images and pseudonymisation keys.\n"
    "It must never be served, shared or copied outside the secure environment.\n"
)


@dataclass(frozen=True)
class SliceRecord:
    """One row of ``index.csv``: everything the store knows about a slice (or volume) besides its pixels."""

    patient: str
    split: str
    label: str
    age: int | None
    sex: str
    scan: int
    position: int
    spacing_row: float
    spacing_col: float
    spacing_slice: float


@dataclass(frozen=True)
class SplitArrays:
    """One split of the store.

    Attributes:
        images: ``[N, 1, H, W]`` slices or ``[N, 1, D, H, W]`` volumes, float32 in [-1, 1] (a read-only memory
            map).
        labels: ``[N]`` int64 label ids (see :attr:`CohortStore.label_names`).
        patients: ``[N]`` patient pseudonyms.
        ages: ``[N]`` int64 age in years (capped at 90; -1 where unknown).
        sexes: ``[N]`` ``F``, ``M`` or ``U`` (unknown).
    """

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    ages: np.ndarray | None = None
    sexes: np.ndarray | None = None


def _private_file(path: Path, data: bytes | str) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, mode) as handle:
        handle.write(data)


def _sha256(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


class StoreWriter:
    """Accumulates slabs in a spill file, then writes the store atomically with :meth:`commit`.

    ``spatial_dims`` 2 stores slices ``[1, size, size]``, 3 stores volumes ``[1, size, size, size]``. Use as a
    context manager; leaving the block without ``commit`` removes all temporary files.
    """

    def __init__(self, path: Path, *, size: int, spatial_dims: int = 2, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise Conflict(f"{self.path} already exists; choose a new --out or pass --force to replace it")
        if spatial_dims not in SPATIAL_DIMS:
            raise InvalidInput(f"spatial dims must be one of {SPATIAL_DIMS}, got {spatial_dims}")
        self.size, self.spatial_dims = size, spatial_dims
        self.item_shape = (1, *(size,) * spatial_dims)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        os.chmod(self._tmp, 0o700)
        self._spill = (self._tmp / "spill.f32").open("wb")
        self._records: list[SliceRecord] = []
        self._overwrite = overwrite
        self._committed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._spill.close()
        if not self._committed:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def n_slices(self) -> int:
        return len(self._records)

    def add(self, images: np.ndarray, records: list[SliceRecord]) -> None:
        """Append ``n`` slices ``[n, 1, size, size]`` or volumes ``[n, 1, size, size, size]``, one record each."""
        if images.shape != (len(records), *self.item_shape):
            raise InvalidInput(f"slab shape {images.shape} does not match {(len(records), *self.item_shape)}")
        self._spill.write(np.ascontiguousarray(images, dtype=np.float32).tobytes())
        self._records.extend(records)

    def commit(
        self,
        *,
        label_names: list[str],
        report: dict,
        secret: bytes,
        privacy_unit: str = "patient",
        budget_epsilon: float = DEFAULT_STORE_BUDGET,
        reset_budget: bool = False,
    ) -> CohortStore:
        """Reorder slices by split, write every file, release the DP patient count, and rename into place.

        A store this one replaces (``overwrite``) hands over its privacy ledger: its patients keep what they have
        spent, unless ``reset_budget`` (the operator's explicit choice, recorded in the new ledger).
        """
        if privacy_unit not in PRIVACY_UNITS:
            raise InvalidInput(f"unknown privacy unit {privacy_unit!r}")
        if not budget_epsilon > 0:
            raise InvalidInput(f"--store-budget must be positive, got {budget_epsilon}")
        self._spill.close()
        if not self._records:
            raise InvalidInput("no usable slices: nothing to store")
        split_rank = {name: i for i, name in enumerate(SPLITS)}
        order = sorted(
            range(len(self._records)),
            key=lambda i: (split_rank[self._records[i].split], self._records[i].patient, i),
        )
        n = len(order)
        spill = np.memmap(self._tmp / "spill.f32", dtype=np.float32, mode="r", shape=(n, *self.item_shape))
        images = np.lib.format.open_memmap(
            self._tmp / "images.npy", mode="w+", dtype=np.float32, shape=(n, *self.item_shape)
        )
        block = max(1, 4096 // self.size ** (self.spatial_dims - 2))  # ≈ the same bytes per copy in 2-D and 3-D
        for start in range(0, n, block):
            chunk = order[start : start + block]
            images[start : start + len(chunk)] = spill[chunk]
        images.flush()
        del images, spill
        (self._tmp / "spill.f32").unlink()

        records = [self._records[i] for i in order]
        fields = list(SliceRecord.__dataclass_fields__)
        fd = os.open(self._tmp / "index.csv", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["slice", *fields])
            writer.writeheader()
            for i, record in enumerate(records):
                writer.writerow({"slice": i, **asdict(record)})

        ranges = {}
        for name in SPLITS:
            idx = [i for i, r in enumerate(records) if r.split == name]
            ranges[name] = [idx[0], idx[-1] + 1] if idx else [0, 0]
        n_train = len({r.patient for r in records if r.split == "train"})
        estimate = noisy_count(n_train) if n_train else 0  # OS entropy: the noise must be unpredictable
        delta = public_default_delta(max(estimate, 1))
        store_id = uuid.uuid4().hex  # random, so naming the store reveals nothing about its data
        meta = {
            "format": STORE_FORMAT,
            "store_id": store_id,
            "spatial_dims": self.spatial_dims,
            "image_size": self.size,
            "n_slices": n,
            "splits": ranges,
            "label_names": label_names,
            "fingerprint": _sha256([self._tmp / "images.npy", self._tmp / "index.csv"]),
            "privacy_unit": privacy_unit,
            "patients_estimate": {
                "value": estimate,
                "noise_std": COUNT_NOISE,
                "mechanism": f"Gaussian mechanism on the training {privacy_unit} count (sensitivity 1, {RELATION})",
            },
            "budget": {"epsilon": budget_epsilon, "delta": delta},
        }
        _private_file(self._tmp / "store.json", json.dumps(meta, indent=2))
        ledger = PrivacyLedger(self._tmp, budget_epsilon=budget_epsilon, budget_delta=delta)
        self._hand_over_ledger(ledger, store_id, reset_budget)
        ledger.record(
            f"patient-count:{store_id}",
            [count_mechanism()],
            status="released",
            what="DP estimate of the training count",
        )
        _private_file(self._tmp / "ingest_report.json", json.dumps(report, indent=2))
        _private_file(self._tmp / "secret.key", secret)
        _private_file(self._tmp / PRIVATE_MARKER, PRIVATE_TEXT)
        for path in self._tmp.iterdir():
            os.chmod(path, 0o600)

        if self.path.exists() and not self._overwrite:
            raise Conflict(f"{self.path} appeared while ingesting; not overwriting it")
        publish_directory(self._tmp, self.path)
        self._committed = True
        return CohortStore.open(self.path)

    def _hand_over_ledger(self, ledger: PrivacyLedger, store_id: str, reset_budget: bool) -> None:
        """Carry the replaced store's ledger into ``ledger`` (or record that the operator reset it)."""
        replaced = _replaced_store(self.path) if self._overwrite else None
        if replaced is None or not replaced.ledger().entries():
            return
        old = replaced.ledger()
        if reset_budget:
            ledger.record(
                f"budget-reset:{store_id}",
                [],
                status="reset",
                what="--reset-budget: the replaced store's releases were not carried over",
                replaced_store=replaced.store_id,
                replaced_spent_epsilon=old.budget().spent,
            )
        else:
            ledger.carry_over(old.entries(), carried_from=replaced.store_id)


def _replaced_store(path: Path) -> CohortStore | None:
    """The store at ``path`` that a new one is about to replace (``None``: nothing there that keeps a ledger)."""
    try:
        return CohortStore.open(path)
    except (NotFound, InvalidInput):
        return None


def previous_secret(path: Path) -> bytes | None:
    """The pseudonymisation secret of the store at ``path``, if one is there (a replacing ingest keeps it, so
    the same patients keep their pseudonyms, their side of the split and their ledger)."""
    store = _replaced_store(path)
    key = path / "secret.key"
    return key.read_bytes() if store is not None and key.is_file() else None


class CohortStore:
    """Read access to a cohort store: ``CohortStore.open(path).read("train")``."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | Path) -> CohortStore:
        """Open a store written by ``synthcohort ingest``; raises ``NotFound``/``InvalidInput`` otherwise."""
        path = Path(path)
        if not path.is_dir():
            raise NotFound(f"no cohort store at {path}")
        meta_path = path / "store.json"
        if not (path / PRIVATE_MARKER).is_file() or not meta_path.is_file():
            raise InvalidInput(f"{path} is not a cohort store (missing {PRIVATE_MARKER} or store.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{meta_path} is unreadable: {exc}") from None
        if meta.get("format") != STORE_FORMAT:
            raise InvalidInput(
                f"unsupported store format {meta.get('format')!r} (expected {STORE_FORMAT}); re-run `synthcohort "
                "ingest` with this version (older stores published exact counts and keep no privacy ledger)"
            )
        return cls(path, meta)

    def __repr__(self) -> str:
        return (
            f"CohortStore(dims={self.spatial_dims}, items={self.n_slices}, size={self.image_size}, "
            f"labels={self.label_names})"
        )

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def spatial_dims(self) -> int:
        """2: the store holds axial slices; 3: whole volumes (``ingest --dims 3``)."""
        return int(self.meta.get("spatial_dims", 2))  # stores written before 3-D hold slices

    @property
    def n_slices(self) -> int:
        """How many items (slices, or volumes in a 3-D store) the store holds."""
        return int(self.meta["n_slices"])

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def store_id(self) -> str:
        """A random id drawn at ingestion: safe to publish (it is not computed from the data)."""
        return str(self.meta["store_id"])

    @property
    def privacy_unit(self) -> str:
        """``patient``, or ``image`` when the inputs could not tell patients apart."""
        return str(self.meta["privacy_unit"])

    @property
    def patients_estimate(self) -> int:
        """N̂: the DP estimate of the number of training patients (public; the exact count is not)."""
        return int(self.meta["patients_estimate"]["value"])

    def ledger(self) -> PrivacyLedger:
        budget = self.meta["budget"]
        return PrivacyLedger(self.path, budget_epsilon=float(budget["epsilon"]), budget_delta=float(budget["delta"]))

    @property
    def report(self) -> dict:
        return json.loads((self.path / "ingest_report.json").read_text())

    def index(self) -> list[dict[str, str]]:
        """All rows of ``index.csv`` (strings, as written)."""
        with (self.path / "index.csv").open(newline="") as handle:
            return list(csv.DictReader(handle))

    def read(self, split: str) -> SplitArrays:
        """Images (memory-mapped, read-only), label ids and patient pseudonyms of one split."""
        if split not in SPLITS:
            raise InvalidInput(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        start, stop = self.meta["splits"][split]
        images = np.load(self.path / "images.npy", mmap_mode="r")[start:stop]
        rows = self.index()[start:stop]
        label_id = {name: i for i, name in enumerate(self.label_names)}
        labels = np.array([label_id[r["label"]] for r in rows], dtype=np.int64)
        patients = np.array([r["patient"] for r in rows], dtype=str)
        ages = np.array([int(r["age"]) if r.get("age") else -1 for r in rows], dtype=np.int64)
        sexes = np.array([r.get("sex") or "U" for r in rows], dtype=str)
        return SplitArrays(images=images, labels=labels, patients=patients, ages=ages, sexes=sexes)

    def spacing(self) -> tuple[float, float, float]:
        """Median ``(row_mm, col_mm, slice_mm)`` over all slices, rounded to 0.1 mm (a coarse acquisition
        statistic that model cards declare as such)."""
        rows = self.index()
        return tuple(  # type: ignore[return-value]
            round(float(np.median([float(r[key]) for r in rows])), 1)
            for key in ("spacing_row", "spacing_col", "spacing_slice")
        )
