"""Run export shards as Ray actors: one model (and filter) per actor, for users who outgrow one machine.

Works against a local Ray (``ray.init(num_cpus=2)``, or started here when none is running) and against a
cluster address. Actors write their files straight into the export's partial directory, so on a cluster
that directory must be on a filesystem every node sees (shared storage).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from app.pipeline import CohortRequest, CohortWorker, Runner, Shard, ShardResult


class _ShardActor:
    def __init__(self, model_dir: str, device: str, allow_not_private: bool) -> None:
        import torch

        torch.set_num_threads(1)
        self.worker = CohortWorker(model_dir, device, allow_not_private)

    def run(self, shard: Shard, request: CohortRequest, root: str) -> ShardResult:
        return self.worker.run_shard(shard, request, Path(root))


def ray_runner(model_dir: Path, workers: int, device: str, address: str | None = None) -> Runner:
    """A runner for :func:`app.pipeline.build_cohort` that spreads shards over ``workers`` Ray actors."""

    def run(shards: list[Shard], request: CohortRequest, root: Path) -> Iterable[ShardResult]:
        import ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        gpus = 1 if device == "cuda" else 0
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(_ShardActor)
        actors = [actor_class.remote(str(model_dir), device, request.allow_not_private) for _ in range(max(1, workers))]
        pool = ActorPool(actors)
        try:
            yield from pool.map_unordered(lambda actor, shard: actor.run.remote(shard, request, str(root)), shards)
        finally:
            for actor in actors:
                ray.kill(actor)

    return run
