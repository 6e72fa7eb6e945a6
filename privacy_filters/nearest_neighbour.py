"""Nearest-neighbour search over embeddings: FAISS (exact flat by default, IVF or HNSW for large N) with a
chunked NumPy brute-force fallback when FAISS is not installed. Distances are Euclidean (not squared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from generators.errors import InvalidInput

IndexKind = Literal["flat", "ivf", "hnsw", "numpy"]
INDEX_KINDS = ("flat", "ivf", "hnsw", "numpy")

faiss: Any
try:  # optional: FAISS is a dependency, but the filter still works without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None


def faiss_available() -> bool:
    return faiss is not None


def brute_force_search(
    database: np.ndarray, queries: np.ndarray, *, k: int = 1, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN with NumPy: ``(distances [Q, k], ids [Q, k])`` nearest first; memory bounded by ``chunk`` rows."""
    best = np.full((len(queries), k), np.inf)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    q_norm = np.einsum("ij,ij->i", queries, queries)
    for start in range(0, len(database), chunk):
        block = np.asarray(database[start : start + chunk], dtype=np.float32)
        d2 = q_norm[:, None] - 2.0 * queries @ block.T + np.einsum("ij,ij->i", block, block)[None, :]
        both = np.concatenate([best, d2], axis=1)
        both_ids = np.concatenate([ids, np.arange(start, start + len(block))[None, :].repeat(len(queries), 0)], 1)
        top = np.argsort(both, axis=1, kind="stable")[:, :k]
        best, ids = np.take_along_axis(both, top, 1), np.take_along_axis(both_ids, top, 1)
    return np.sqrt(np.maximum(best, 0.0)), ids


class NearestNeighbourIndex:
    """An index of training embeddings that answers 1-NN queries.

    Args:
        dim: embedding dimension.
        kind: ``flat`` (exact, FAISS), ``ivf`` (FAISS IVF-Flat, ``nlist ≈ 4·sqrt(N)``, ``nprobe`` cells
            searched), ``hnsw`` (FAISS HNSW, ``ef_search``), or ``numpy`` (exact brute force).
    """

    def __init__(self, dim: int, kind: IndexKind = "flat", *, nprobe: int = 16, ef_search: int = 128) -> None:
        if kind not in INDEX_KINDS:
            raise InvalidInput(f"unknown index kind {kind!r}; choose one of {list(INDEX_KINDS)}")
        if kind != "numpy" and faiss is None:
            kind = "numpy"  # documented fallback
        self.dim, self.kind, self.nprobe, self.ef_search = dim, kind, nprobe, ef_search
        self._faiss: Any = None
        self._vectors: np.ndarray | None = None

    def __len__(self) -> int:
        if self._faiss is not None:
            return int(self._faiss.ntotal)
        return 0 if self._vectors is None else len(self._vectors)

    def build(self, vectors: np.ndarray) -> NearestNeighbourIndex:
        """Index all ``vectors`` ``[N, dim]`` (float32)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) == 0:
            raise InvalidInput(f"expected a non-empty [N, {self.dim}] array, got {vectors.shape}")
        if self.kind == "numpy":
            self._vectors = vectors
            return self
        index: Any
        if self.kind == "flat":
            index = faiss.IndexFlatL2(self.dim)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, 32)
            index.hnsw.efConstruction = 80
        else:
            nlist = max(1, min(len(vectors) // 39, int(4 * np.sqrt(len(vectors)))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, nlist)
            sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: 64 * nlist]]
            index.train(sample)
        index.add(vectors)
        self._faiss = index
        self._configure()
        return self

    def _configure(self) -> None:
        if self.kind == "ivf":
            self._faiss.nprobe = self.nprobe
        elif self.kind == "hnsw":
            self._faiss.hnsw.efSearch = self.ef_search

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of each query, nearest first: ``(distances, ids)``, each ``[Q]`` for ``k = 1`` else ``[Q, k]``.

        Where the index holds fewer than ``k`` vectors, missing neighbours have id -1 and distance ∞.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInput(f"expected queries of shape [Q, {self.dim}], got {queries.shape}")
        if len(self) == 0:
            raise InvalidInput("the index is empty")
        if self._faiss is None:
            assert self._vectors is not None  # len(self) > 0
            d, ids = brute_force_search(self._vectors, queries, k=k)
        else:
            d2, ids = self._faiss.search(queries, k)
            d = np.where(ids >= 0, np.sqrt(np.maximum(d2.astype(np.float64), 0.0)), np.inf)
            ids = ids.astype(np.int64)
        return (d[:, 0], ids[:, 0]) if k == 1 else (d, ids)

    def save(self, path: Path) -> None:
        if self._faiss is not None:
            faiss.write_index(self._faiss, str(path))
        elif self._vectors is not None:
            np.save(path, self._vectors, allow_pickle=False)
        else:
            raise InvalidInput("the index is empty: build it before saving it")

    @classmethod
    def load(
        cls, path: Path, *, dim: int, kind: IndexKind, nprobe: int = 16, ef_search: int = 128
    ) -> NearestNeighbourIndex:
        index = cls(dim, kind, nprobe=nprobe, ef_search=ef_search)
        if kind == "numpy":
            index._vectors = np.load(path, allow_pickle=False)
        else:
            if faiss is None:
                raise InvalidInput("this filter was saved with a FAISS index; install faiss-cpu to load it")
            index._faiss = faiss.read_index(str(path))
            index._configure()
        return index
