"""Memorization filter: embedding comparison on canaries and nearest-neighbour search speed.

    .venv/bin/python benchmarks/privacy/bench_filter.py --store demo/store

Part 1 builds the filter on the store with each embedding and reports canary rejection per kind,
held-out acceptance (2-fold by patient) and blend rejection. Part 2 grows the index to 10 k, 100 k and 1 M
slices (real training embeddings plus jittered copies of them) and times 1-NN queries with NumPy brute
force, FAISS flat, IVF and HNSW on the same embeddings, with the recall of each index on canaries.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from privacy_filters import MemorizationFilter
from privacy_filters.canaries import make_canaries
from privacy_filters.embeddings import embed, make_embedding
from privacy_filters.nearest_neighbour import NearestNeighbourIndex, brute_force_search
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def compare_embeddings(store: CohortStore) -> None:
    train, holdout = store.read("train"), store.read("holdout")
    print(
        "| embedding | dim | exact | shift ±2 px | flip | noise σ 0.05 | contrast ±10 % | held-out accepted | "
        "blend 0.8/0.2 rejected | build s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("aligned-pyramid", "pixels"):
        start = time.perf_counter()
        filt = MemorizationFilter.build(train.images, holdout.images, holdout_groups=holdout.patients, embedding=name)
        seconds = time.perf_counter() - start
        r, kinds = filt.record, filt.record["canary_rejection_by_kind"]
        dim = make_embedding(name, store.image_size).dim
        print(
            f"| {name} | {dim} | {kinds['exact']:.1%} | {kinds['shift']:.1%} | {kinds['flip']:.1%} | "
            f"{kinds['noise']:.1%} | {kinds['contrast']:.1%} | {r['holdout_acceptance_rate']:.1%} | "
            f"{r['blend_rejection_rate']:.1%} | {seconds:.1f} |"
        )


def qps(fn, queries: np.ndarray) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    start = time.perf_counter()
    result = fn(queries)
    return len(queries) / (time.perf_counter() - start), result


def recall(found: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of queries answered with the exact neighbour, or one as close (within float32 rounding of
    FAISS' distance formula): the demo store holds identical slices of patients scanned twice."""
    (d, ids), (d_exact, ids_exact) = found, exact
    tolerance = 1e-3 * d_exact + 1e-4
    return float(np.mean((ids == ids_exact) | (d <= d_exact + tolerance)))


def head(result: tuple[np.ndarray, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    return result[0][:n], result[1][:n]


def search_speed(store: CohortStore, sizes: list[int], n_queries: int) -> None:
    rng = np.random.default_rng(0)
    emb = make_embedding("aligned-pyramid", store.image_size)
    train = store.read("train").images
    base = embed(emb, train)
    pick = rng.choice(len(train), size=n_queries // 2, replace=False)
    canaries = embed(emb, make_canaries(np.asarray(train[pick]), "noise", seed=1))
    unseen = embed(emb, np.asarray(store.read("holdout").images[: n_queries - len(pick)]))
    queries = np.concatenate([canaries, unseen]).astype(np.float32)
    scale = float(np.median(brute_force_search(base, unseen[:200])[0])) / np.sqrt(emb.dim)
    print("| training slices | method | queries/s | × numpy | recall canaries | recall all | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        extra = n - len(base)
        jitter = base[rng.integers(len(base), size=max(extra, 0))] + rng.normal(0, scale, (max(extra, 0), emb.dim))
        vectors = np.concatenate([base, jitter.astype(np.float32)])[:n]
        n_numpy = min(len(queries), max(50, int(2e9 / (n * emb.dim))))
        numpy_qps, _ = qps(lambda q, v=vectors: brute_force_search(v, q), queries[:n_numpy])
        print(f"| {n:,} | numpy brute force | {numpy_qps:,.0f} | 1.0 | 1.000 | 1.000 | 0 |")
        exact = None
        methods = [("flat", {}), ("ivf", {"nprobe": 4}), ("ivf", {"nprobe": 16})]
        if n <= 100_000:  # HNSW construction at 1 M takes too long on 2 cores
            methods.append(("hnsw", {"ef_search": 128}))
        for kind, knobs in methods:
            start = time.perf_counter()
            index = NearestNeighbourIndex(emb.dim, kind, **knobs).build(vectors)
            build = time.perf_counter() - start
            speed, found = qps(index.search, queries)
            if kind == "flat":
                exact = found
            label = f"faiss {kind}" + "".join(f" {k}={v}" for k, v in knobs.items())
            print(
                f"| {n:,} | {label} | {speed:,.0f} | {speed / numpy_qps:.1f} | "
                f"{recall(head(found, len(pick)), head(exact, len(pick))):.3f} | {recall(found, exact):.3f} | "
                f"{build:.1f} |"
            )
            del index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--skip-embeddings", action="store_true")
    args = parser.parse_args()
    store = CohortStore.open(args.store)
    print(f"{machine_header()}; store {store!r}\n")
    if not args.skip_embeddings:
        compare_embeddings(store)
        print()
    search_speed(store, [int(s) for s in args.sizes.split(",")], args.queries)


if __name__ == "__main__":
    main()
