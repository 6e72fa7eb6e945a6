"""Process pools for data preparation (``demo-data``, ``ingest``): one worker per core, one thread per worker.

A worker that kept torch's and the BLAS/OpenMP libraries' default thread counts would start one thread per core
in every worker, so W workers ran W × cores threads on the same cores and throughput stopped growing with W.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

_limits: object = None  # the thread limits of this worker process (kept referenced for its lifetime)


def _one_thread() -> None:
    global _limits
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    _limits = threadpool_limits(limits=1)  # numpy's and scipy's BLAS and OpenMP pools


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes, each limited to one thread."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_one_thread)
