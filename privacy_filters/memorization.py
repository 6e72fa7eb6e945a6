"""The memorization filter: reject generated images that sit closer to a training image than unseen
real patients do.

```python
f = MemorizationFilter.build(train_images, holdout_images, quantile=0.05)  # [N, 1, (D,) H, W] float32 in [-1, 1]
f.save(path); f = MemorizationFilter.load(path)
decisions = f.check(images)  # list[FilterDecision(accepted, score, reason)]
```

Closeness is measured in one or more *views* (default: two), each an embedding with its own index:

- ``near-copy``: the index proposes the ``k`` nearest training slices of the image and of its mirror image
  in a pooled canonical embedding; each is re-ranked by the near-copy distance of
  :mod:`privacy_filters.near_copy` (after searching small rotations and zooms, robust to a few changed
  pixels). It catches rotated, zoomed, cropped, re-contrasted, blurred and noised copies.
- ``aligned-pyramid``: the plain embedding distance to the nearest training slice (image or mirror). It is
  the more sensitive to what a memorizing generator actually produces (see BENCHMARKS.md).

Volumes (3-D models) are measured in the 3-D ``aligned-pyramid`` view (centre-of-mass alignment on three axes,
z-scoring, blur, pooling to 8³; image and left-right mirror image) and self-tested with the 3-D canary kinds
(:data:`~privacy_filters.canaries.KINDS_3D`).

Each view's threshold is the ``q / V``-th quantile of held-out patients' nearest-training distances in that
view, so that by the union bound at most ``q`` of unseen patients are rejected; an image is rejected when it
is that close in *any* view. ``distances()`` returns the smallest ratio ``distance / view threshold`` (the
filter's threshold on it is 1); scores are internal, and the neighbour's identity never leaves this object
except through :meth:`nearest_training_indices`, which exists for internal audits only and must never be
exposed to an API caller.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generators.atomic import publish_directory
from generators.errors import InvalidInput, NotFound
from privacy_filters import calibration
from privacy_filters.canaries import (
    DOCUMENTED,
    KINDS_3D,
    NOT_COVERED,
    STRENGTH_GRID,
    make_blends,
    make_canaries,
    transform,
)
from privacy_filters.embeddings import Embedding, NearCopy, embed, make_embedding
from privacy_filters.near_copy import AlignmentSearch, compared, near_copy_distance
from privacy_filters.nearest_neighbour import IndexKind, NearestNeighbourIndex

FILTER_FORMAT = 2
DEFAULT_VIEWS = ("near-copy", "aligned-pyramid")
DEFAULT_VIEWS_3D = ("aligned-pyramid",)
SELF_TEST_IMAGES = 256
SELF_TEST_KINDS = ("exact", "flip", *DOCUMENTED)
RERANK_K = 8  # candidates per query and per mirror image, re-ranked by the aligned distance
QUERY_CHUNKS = {"cpu": 32, "cuda": 1024}  # queries re-ranked together: cache-sized on a CPU, wide on a GPU
CANONICAL_FILE = "canonical.npy"


class Reranker:
    """The training slices' canonical images and the alignment search that re-ranks the index's candidates."""

    def __init__(self, canonical: np.ndarray, search: AlignmentSearch = AlignmentSearch(), k: int = RERANK_K) -> None:
        self.canonical = canonical  # (N, P) float32 comparison vectors (near_copy.compared) of the training slices
        self.search = search
        self.k = k

    def distances(self, queries: torch.Tensor, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best near-copy distance of each canonical query ``(Q, 1, g, g)`` over its candidate ids ``(Q, C)``."""
        candidates = np.where(candidates >= 0, candidates, candidates.max(axis=1, keepdims=True))  # pad short lists
        rows = torch.from_numpy(self.canonical[candidates].astype(np.float32)).to(queries.device)  # (Q, C, P)
        d, best = near_copy_distance(queries, rows, self.search)
        return d.cpu().numpy().astype(np.float64), candidates[np.arange(len(candidates)), best.cpu().numpy()]


@dataclass(frozen=True)
class FilterDecision:
    """The verdict on one image. ``score`` = distance / threshold; ``accepted`` iff ``score >= 1``."""

    accepted: bool
    score: float
    reason: str


def validate_images(
    images: np.ndarray | torch.Tensor, *, what: str, size: int | None = None, spatial_dims: int | None = None
) -> np.ndarray:
    """Check ``[N, 1, H, H]`` slices or ``[N, 1, H, H, H]`` volumes, float32 in [-1, 1], finite and non-empty;
    return a NumPy view. ``size`` and ``spatial_dims`` pin the shape to a built filter's."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"{what} must be a NumPy array or torch tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5) or images.shape[1] != 1 or len(set(images.shape[2:])) != 1:
        raise InvalidInput(f"{what} must have shape [N, 1, H, H] or [N, 1, H, H, H], got {list(images.shape)}")
    if len(images) == 0:
        raise InvalidInput(f"{what} is empty")
    if images.dtype != np.float32:
        raise InvalidInput(f"{what} must be float32, got {images.dtype}")
    if (size is not None and images.shape[2] != size) or (spatial_dims is not None and images.ndim - 2 != spatial_dims):
        wanted = "x".join([str(size)] * (spatial_dims or images.ndim - 2))
        raise InvalidInput(f"{what} are {'x'.join(map(str, images.shape[2:]))} but the filter was built for {wanted}")
    if images.shape[2] < 8:
        raise InvalidInput(f"{what} are too small ({images.shape[2]} px); need at least 8")
    sample = np.asarray(images[: min(len(images), 65536)])  # bounded check on huge memory maps
    if not np.all(np.isfinite(sample)):
        raise InvalidInput(f"{what} contain NaN or infinite values")
    if sample.min() < -1.001 or sample.max() > 1.001:
        raise InvalidInput(f"{what} must be scaled to [-1, 1], found [{sample.min():.3g}, {sample.max():.3g}]")
    return images


class View:
    """One way of measuring closeness to the training set: an embedding, its index, optionally a re-ranker.
    Embedding and re-ranking run on ``device``; the index searches on the CPU (FAISS)."""

    def __init__(
        self,
        embedding: Embedding,
        index: NearestNeighbourIndex,
        reranker: Reranker | None = None,
        threshold: float = float("nan"),
        device: torch.device | str = "cpu",
    ) -> None:
        self.embedding, self.index, self.reranker, self.threshold = embedding, index, reranker, threshold
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return self.embedding.name

    @classmethod
    def build(
        cls,
        name: str,
        train: np.ndarray,
        index: IndexKind,
        progress: Callable[[int], None] | None,
        device: torch.device | str = "cpu",
    ) -> View:
        emb = make_embedding(name, train.shape[2], train.ndim - 2)
        vectors, canonical = _embed_training(emb, train, progress, torch.device(device))
        return cls(
            emb,
            NearestNeighbourIndex(emb.dim, index).build(vectors),
            Reranker(canonical) if canonical is not None else None,
            device=device,
        )

    def search(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(distance to the nearest training image, its row id)`` in this view (image or mirror image)."""
        if self.reranker is not None:
            return self._near_copy_search(images)
        direct, direct_ids = self.index.search(embed(self.embedding, images, device=self.device))
        mirror, mirror_ids = self.index.search(embed(self.embedding, images, mirror=True, device=self.device))
        use_mirror = mirror < direct
        return np.where(use_mirror, mirror, direct), np.where(use_mirror, mirror_ids, direct_ids)

    @torch.no_grad()
    def _near_copy_search(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the index (image and mirror image), re-ranked by the aligned near-copy distance.

        Canonical forms and re-ranking go chunk by chunk (:data:`QUERY_CHUNKS`); the index is searched once for
        every query and its mirror image (a flat index is fastest on many queries at once)."""
        assert isinstance(self.embedding, NearCopy) and self.reranker is not None
        k, size = self.reranker.k, QUERY_CHUNKS.get(self.device.type, QUERY_CHUNKS["cpu"])
        canonical = [
            self.embedding.canonical(
                torch.from_numpy(np.array(images[start : start + size], dtype=np.float32)).to(self.device)
            )
            for start in range(0, len(images), size)
        ]  # (Q, 1, g, g) each
        every = torch.cat(canonical)
        queries = torch.cat([self.embedding.pooled(every), self.embedding.pooled(torch.flip(every, dims=(3,)))])
        _, found = self.index.search(queries.cpu().numpy(), k=k)
        found = found.reshape(2, len(images), -1)  # every image's candidates, then every mirror image's
        distances, ids = np.empty(len(images)), np.empty(len(images), dtype=np.int64)
        start = 0
        for chunk in canonical:
            stop = start + len(chunk)
            candidates = np.concatenate([found[0, start:stop], found[1, start:stop]], axis=1)
            distances[start:stop], ids[start:stop] = self.reranker.distances(chunk, candidates)
            start = stop
        return distances, ids

    def describe(self, files: str) -> dict:
        """This view's entry in ``filter.json`` (its files are named ``<files>.faiss`` / ``.npy``)."""
        entry = {
            "embedding": self.name,
            "threshold": self.threshold,
            "index": self.index.kind,
            "index_file": f"{files}.npy" if self.index.kind == "numpy" else f"{files}.faiss",
            "nprobe": self.index.nprobe,
            "ef_search": self.index.ef_search,
        }
        if self.reranker is not None:
            entry["rerank"] = {
                "k": self.reranker.k,
                "file": f"{files}-{CANONICAL_FILE}",
                **asdict(self.reranker.search),
            }
        return entry

    def save(self, root: Path, entry: dict) -> None:
        self.index.save(root / entry["index_file"])
        if self.reranker is not None:
            np.save(root / entry["rerank"]["file"], self.reranker.canonical, allow_pickle=False)

    @classmethod
    def load(
        cls, root: Path, entry: dict, image_size: int, spatial_dims: int = 2, device: torch.device | str = "cpu"
    ) -> View:
        emb = make_embedding(entry["embedding"], image_size, spatial_dims)
        index = NearestNeighbourIndex.load(
            root / entry["index_file"],
            dim=emb.dim,
            kind=entry["index"],
            nprobe=entry["nprobe"],
            ef_search=entry["ef_search"],
        )
        reranker = None
        if "rerank" in entry:
            rerank = {k: v for k, v in entry["rerank"].items() if k not in ("k", "file")}
            fields: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in rerank.items()}
            search = AlignmentSearch(**fields)
            canonical = np.load(root / entry["rerank"]["file"], mmap_mode="r", allow_pickle=False)
            reranker = Reranker(canonical, search, int(entry["rerank"]["k"]))
        return cls(emb, index, reranker, float(entry["threshold"]), device=device)


class MemorizationFilter:
    """Nearest-training-image filter over one or more views, calibrated on held-out patients (module docstring)."""

    def __init__(self, views: list[View], image_size: int, record: dict) -> None:
        self._views = views
        self.image_size = image_size
        self.spatial_dims = int(record.get("spatial_dims", 2))  # filters written before 3-D measure slices
        self.record = record  # calibration record: q, threshold (1 on normalised distances), rates, statement

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The spatial shape of the images this filter measures: ``(H, W)`` or ``(D, H, W)``."""
        return (self.image_size,) * self.spatial_dims

    def __repr__(self) -> str:
        names = "+".join(view.name for view in self._views)
        return f"MemorizationFilter(views={names}, n_train={len(self._views[0].index)}, q={self.quantile})"

    @property
    def threshold(self) -> float:
        return float(self.record["threshold"])

    @property
    def quantile(self) -> float:
        return float(self.record["quantile"])

    # --------------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        train_images: np.ndarray | torch.Tensor,
        holdout_images: np.ndarray | torch.Tensor,
        quantile: float = 0.05,
        *,
        holdout_groups: np.ndarray | None = None,
        embedding: str | Sequence[str] | None = None,
        index: IndexKind = "flat",
        self_test: bool = True,
        seed: int = 0,
        min_holdout_patients: int = calibration.MIN_HOLDOUT_PATIENTS,
        progress: Callable[[int], None] | None = None,
        device: torch.device | str = "cpu",
    ) -> MemorizationFilter:
        """Index ``train_images`` in every view and calibrate the views' thresholds on ``holdout_images``.

        Args:
            embedding: one view name or several (``"near-copy,aligned-pyramid"`` or a sequence); default
                :data:`DEFAULT_VIEWS` for slices, :data:`DEFAULT_VIEWS_3D` for volumes.
            holdout_groups: patient key per held-out image; thresholds are quantiles over patients
                (defaults to one group per image).
            min_holdout_patients: refuse to calibrate on fewer held-out patients (tests of the filter's
                mechanics on synthetic arrays may lower it; real calibration never does).
            self_test: plant near-copies of training images and record how many are rejected.
            device: where embedding and re-ranking run (the same distances on every device, to float tolerance).
        """
        train = validate_images(train_images, what="training images")
        dims = train.ndim - 2
        holdout = validate_images(holdout_images, what="held-out images", size=train.shape[2], spatial_dims=dims)
        if not 0.0 < quantile < 0.5:
            raise InvalidInput(f"quantile must be in (0, 0.5), got {quantile}")
        if embedding is None:
            embedding = DEFAULT_VIEWS_3D if dims == 3 else DEFAULT_VIEWS
        names = [n.strip() for n in embedding.split(",")] if isinstance(embedding, str) else list(embedding)
        if not names or len(set(names)) != len(names):
            raise InvalidInput(f"give one or more distinct embeddings, got {names}")
        groups = np.arange(len(holdout)) if holdout_groups is None else np.asarray(holdout_groups)
        if len(groups) != len(holdout):
            raise InvalidInput("holdout_groups must have one entry per held-out image")
        views = [View.build(name, train, index, progress, device) for name in names]

        # calibrate: per view, each held-out patient's smallest distance; thresholds at q / V (union bound)
        patient_distances = np.stack(
            [calibration.per_patient(view.search(holdout)[0], groups) for view in views], axis=1
        )  # (P, V)
        calibration.require_patients(len(patient_distances), minimum=min_holdout_patients)
        for view, column in zip(views, patient_distances.T, strict=True):
            view.threshold = calibration.threshold(column, quantile / len(views))
        record = {
            "format": FILTER_FORMAT,
            "quantile": quantile,
            "threshold": 1.0,
            "embedding": "+".join(names),
            "views": [view.describe(f"view{i}") for i, view in enumerate(views)],
            "image_size": train.shape[2],
            "spatial_dims": dims,
            "n_train": len(train),
            "n_holdout": len(holdout),
            "n_holdout_patients": len(patient_distances),
            "holdout_acceptance_rate": calibration.cross_validated_acceptance(patient_distances, quantile),
            "holdout_acceptance_method": "share of held-out patients accepted, 2-fold by patient: calibrate on "
            "half the held-out patients, test on the rest",
            "statement": calibration.STATEMENT.format(q=quantile),
        }
        filt = cls(views, train.shape[2], record)
        if self_test:
            record.update(filt.self_test(train, seed=seed))
        return filt

    def self_test(self, train: np.ndarray, *, seed: int = 0) -> dict:
        """Rejection rates of planted near-copies (every documented transform) of up to 256 training images."""
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(train), size=min(SELF_TEST_IMAGES, len(train)), replace=False))
        sources = np.asarray(train[pick], dtype=np.float32)
        kinds = KINDS_3D if self.spatial_dims == 3 else SELF_TEST_KINDS
        by_kind = {
            kind: float(np.mean(self.distances(make_canaries(sources, kind, seed=seed)) < self.threshold))
            for kind in kinds
        }
        others = np.asarray(train[np.sort(rng.choice(len(train), size=len(pick), replace=True))], dtype=np.float32)
        blend = float(np.mean(self.distances(make_blends(sources, others)) < self.threshold))
        return {
            "canary_rejection_rate": float(np.mean([v for k, v in by_kind.items() if k not in NOT_COVERED])),
            "canary_rejection_by_kind": by_kind,
            "canaries_not_covered": list(NOT_COVERED),
            "canary_strengths": {k: DOCUMENTED[k] for k in by_kind if k in DOCUMENTED},
            "blend_rejection_rate": blend,
            "n_canaries_per_kind": len(pick),
        }

    # --------------------------------------------------------------------------------------- query
    def distances(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised distance to the training set: the smallest ``distance / threshold`` over the views."""
        return self._search(images)[0]

    def _search(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = validate_images(images, what="images", size=self.image_size, spatial_dims=self.spatial_dims)
        found = [view.search(images) for view in self._views]
        ratios = np.stack([d / view.threshold for view, (d, _) in zip(self._views, found, strict=True)])  # (V, N)
        ids = np.stack([i for _, i in found])
        closest, pick = ratios.argmin(axis=0), np.arange(len(images))  # the view in which each image is closest
        return ratios[closest, pick], ids[closest, pick]

    def check(self, images: np.ndarray | torch.Tensor) -> list[FilterDecision]:
        """Accept or reject each image; scores are ratios to the threshold (≥ 1 accepted)."""
        scores = calibration.scores(self.distances(images), self.threshold)
        return [
            FilterDecision(
                accepted=bool(s >= 1.0),
                score=float(s),
                reason="accepted" if s >= 1.0 else f"too close to a training image (score {s:.3f} < 1)",
            )
            for s in scores
        ]

    def nearest_training_indices(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """INTERNAL AUDIT ONLY: ``(distances, training row ids)``. Never return these to an API caller."""
        return self._search(images)

    # ------------------------------------------------------------------------------------- persist
    def save(self, path: str | Path) -> None:
        """Write ``filter.json`` + every view's index into directory ``path`` atomically (temp dir + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, 0o700)
            entries = [view.describe(f"view{i}") for i, view in enumerate(self._views)]
            for view, entry in zip(self._views, entries, strict=True):
                view.save(tmp, entry)
            (tmp / "filter.json").write_text(json.dumps({**self.record, "views": entries}, indent=2))
            (tmp / "PRIVATE").write_text("Training-derived nearest-neighbour index. Never serve or share.\n")
            for file in tmp.iterdir():
                os.chmod(file, 0o600)
            publish_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> MemorizationFilter:
        """The filter saved at ``path``; its embedding and re-ranking run on ``device``."""
        path = Path(path)
        meta_path = path / "filter.json"
        if not meta_path.is_file():
            raise NotFound(f"no memorization filter at {path}; run `synthcohort calibrate STORE MODEL_DIR` first")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{meta_path} is corrupt: {exc}") from None
        if meta.get("format") != FILTER_FORMAT or "views" not in meta:
            raise InvalidInput(
                f"unsupported filter format {meta.get('format')!r}; re-run `synthcohort calibrate STORE MODEL_DIR`"
            )
        size, dims = int(meta["image_size"]), int(meta.get("spatial_dims", 2))
        return cls([View.load(path, entry, size, dims, device) for entry in meta["views"]], size, meta)


def _embed_training(
    emb: Embedding, train: np.ndarray, progress: Callable[[int], None] | None, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """Index vectors of every training image, and (near-copy embedding) their comparison vectors."""
    vectors = np.empty((len(train), emb.dim), dtype=np.float32)
    canonical = None
    if isinstance(emb, NearCopy):
        canonical = np.empty((len(train), compared(torch.zeros(1, 1, emb.grid, emb.grid)).shape[1]), np.float32)
    step = 2048
    for start in range(0, len(train), step):
        chunk = np.array(train[start : start + step], dtype=np.float32)  # a writable copy of a memory map
        if canonical is not None:
            assert isinstance(emb, NearCopy)
            with torch.no_grad():
                c = emb.canonical(torch.from_numpy(chunk).to(device))
            canonical[start : start + len(chunk)] = compared(c).cpu().numpy()
            vectors[start : start + len(chunk)] = emb.pooled(c).cpu().numpy()
        else:
            vectors[start : start + len(chunk)] = embed(emb, chunk, device=device)
        if progress:
            progress(len(chunk))
    return vectors, canonical


def public_summary(record: dict) -> dict:
    """What may be published about a filter: its rule and coarse rates (whole percent), no counts computed
    from the store, no threshold in embedding units, no paths, no neighbours."""
    summary: dict = {k: record[k] for k in ("quantile", "embedding", "statement") if k in record}
    for key in ("holdout_acceptance_rate", "canary_rejection_rate", "blend_rejection_rate"):
        if record.get(key) is not None:
            summary[key] = round(float(record[key]), 2)
    if "canary_rejection_by_kind" in record:
        summary["canary_rejection_by_kind"] = {
            k: round(float(v), 2) for k, v in record["canary_rejection_by_kind"].items()
        }
    summary["covered_by_epsilon"] = False
    return summary


def rejection_curves(
    filt: MemorizationFilter,
    sources: np.ndarray,
    grid: dict[str, tuple[float, ...]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, list[dict[str, float]]]:
    """For every transform kind and strength, the share of near-copies of ``sources`` that ``filt`` rejects.

    Returns ``{kind: [{"strength": s, "rejected": r}, ...]}`` (``grid`` defaults to ``canaries.STRENGTH_GRID``).
    """
    curves: dict[str, list[dict[str, float]]] = {}
    for kind, strengths in (grid or STRENGTH_GRID).items():
        curves[kind] = [
            {
                "strength": float(strength),
                "rejected": float(
                    np.mean(filt.distances(transform(sources, kind, strength, seed=seed)) < filt.threshold)
                ),
            }
            for strength in strengths
        ]
    return curves
