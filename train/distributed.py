"""DP training across processes and machines: ``torch.distributed``, launched by ``torchrun``.

``synthcohort train … --nproc-per-node N`` starts the same command under ``torch.distributed.run`` (one process
per GPU, or per group of CPU cores); the same code also runs when started by ``torchrun`` directly. How one
DP-SGD step stays the single-process step:

- **Sampling.** Rank ``r`` of ``W`` owns the training patients ``r, r + W, r + 2W, …`` and draws each of them
  with probability ``q`` from its own OS-entropy generator: every patient is included with probability ``q``,
  independently, exactly once across the ranks (the union is one Poisson sample of all patients).
- **Gradients and noise.** Each rank clips its patients' gradients and sums them; the sums are all-reduced and
  the Gaussian noise 𝒩(0, σ²C²) is drawn once, by rank 0 from OS entropy (Opacus' ``DistributedDPOptimizer``).
  Every rank divides by ``q·N̂ / W`` and the all-reduce averages over ``W``: the update is (Σ clipped + noise)
  / (q·N̂), the single-process update.
- **Accounting.** The accountant sees the global ``q``, ``σ`` and steps; rank 0 alone writes the ledger, the
  checkpoint and the bundle, whose card records the world size.
- **Public work.** The public prior runs on rank 0 and its weights are broadcast; calibration runs after
  training, in one process (``synthcohort calibrate``).
- **Failures.** Every collective has a timeout; a rank that dies makes the others fail (no silent hang) and the
  last checkpoint resumes with ``--resume`` at any world size (the ranks' generators then restart from OS
  entropy: the same distribution, not the same draws).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from generators.errors import InvalidInput

COLLECTIVE_TIMEOUT_S = 300.0  # a rank silent for this long fails the run (its checkpoint stays resumable)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (``size`` 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owned(self, n_patients: int) -> torch.Tensor:
        """The training-patient indices this rank samples: ``rank, rank + size, …``."""
        return torch.arange(self.rank, n_patients, self.size)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process on a machine (its local rank); CPUs are shared."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether any rank says ``flag`` (every rank gets the same answer: they stop together)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over the ranks."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank."""
        if self.distributed:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def join_world(device: str = "auto", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> World:
    """This process's :class:`World`: joins the process group ``torchrun`` describes in the environment (NCCL on
    GPUs, gloo on CPUs; every collective times out after ``timeout_s``), or a world of one without it."""
    world = current_world()
    if world.distributed and not dist.is_initialized():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return world


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    """The world ``torchrun`` describes in the environment, without joining it (for output decisions)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


# ------------------------------------------------------------------------------------------------ launching
@dataclass(frozen=True)
class Launch:
    """``--nproc-per-node`` and friends: how ``synthcohort train`` starts itself under ``torch.distributed.run``."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_timeout_s: float = 60.0

    def check(self) -> None:
        """Refuse a launch that cannot work, with the fix."""
        if self.nproc_per_node < 1:
            raise InvalidInput("--nproc-per-node must be at least 1")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise InvalidInput("--node-rank must lie in 0 … --nnodes − 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise InvalidInput("several machines need --rdzv-endpoint HOST:PORT (a port on the machine of node 0)")
        if self.rdzv_endpoint:
            _split_endpoint(self.rdzv_endpoint)

    def command(self, argv: list[str]) -> list[str]:
        """The ``python -m torch.distributed.run … -m app.cli <argv>`` command line."""
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.nnodes == 1 and not self.rdzv_endpoint:
            launcher.append("--standalone")  # a free local port; no endpoint to agree on
        else:
            launcher += [
                f"--nnodes={self.nnodes}",
                f"--node-rank={self.node_rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-conf=join_timeout={int(self.rdzv_timeout_s)},read_timeout={int(self.rdzv_timeout_s)}",
            ]
        return [*launcher, "--max-restarts=0", "-m", "app.cli", *argv]


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def wait_for_endpoint(endpoint: str, timeout_s: float) -> None:
    """A node other than node 0 first waits (up to ``timeout_s``) for node 0's rendezvous port to answer, so an
    unreachable endpoint is a clear error instead of a launcher retrying for many minutes."""
    host, port = _split_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise InvalidInput(
                    f"rendezvous endpoint {endpoint} did not answer within {timeout_s:g} s ({exc.strerror or exc}); "
                    "start node 0 first and check the host, the port and the firewall"
                ) from None
            time.sleep(0.5)


def launch(plan: Launch, argv: list[str]) -> int:
    """Run the training command ``argv`` under ``torch.distributed.run``; returns its exit status."""
    plan.check()
    if plan.node_rank > 0 and plan.rdzv_endpoint:
        wait_for_endpoint(plan.rdzv_endpoint, plan.rdzv_timeout_s)
    env = {**os.environ}
    if "OMP_NUM_THREADS" not in env:  # CPU processes share the machine's cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node))
    code = subprocess.run(plan.command(argv), env=env, check=False).returncode
    if code not in (0, 130):
        print(
            f"error: a training process failed (exit status {code}; the launcher's report above names the rank); "
            "the last checkpoint resumes with the same command and --resume, at any --nproc-per-node",
            file=sys.stderr,
        )
    return code
