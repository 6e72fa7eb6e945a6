"""DP training in several processes (torch.distributed, gloo on CPU) against one process, and the all-reduce on paper.

    .venv/bin/python benchmarks/perf/bench_distributed.py --store demo/store --out bench_runs/distributed --steps 20

Trains the same recipe twice through the CLI, as a user would: ``--nproc-per-node P`` with ``cores / P`` threads
per process, then one process with every core, and prints seconds per DP step from each run's private training
record. The correctness of the distributed step is a test (tests/test_distributed.py); this measures speed only.
Then, from the presets' networks: the gradient bytes each step all-reduces and what that costs over NVLink and
over 25 Gb/s Ethernet for 2–8 GPUs (ring all-reduce: each rank sends and receives 2 (W − 1) / W of the bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train.dp_training import build_network, read_training_record
from train.presets import get_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

LINKS_GB_S = {"NVLink (≈ 300 GB/s per direction, H100/H200 class)": 300.0, "25 Gb/s Ethernet": 25 / 8}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--nproc", type=int, default=2)
    return parser.parse_args()


def train_run(store: Path, out: Path, preset: str, steps: int, nproc: int | None, threads: int) -> dict:
    """One CLI training run (ε 8, no public prior, ``steps`` DP steps); seconds per step and in all."""
    command = [sys.executable, "-m", "app.cli", "train", str(store), "--out", str(out), "--epsilon", "8"]
    command += ["--preset", preset, "--max-steps", str(steps), "--public-pretrain-steps", "0", "--force"]
    command += ["--allow-over-budget"]  # a benchmark on the demo cohort: its runs are recorded, not refused
    if nproc:
        command += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SYNTHCOHORT_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    record = read_training_record(out)
    return {
        "processes": nproc or 1,
        "threads_each": threads,
        "s_per_step": record["training_wall_time_s"] / steps,
        "wall_s": time.perf_counter() - started,
    }


def allreduce_rows() -> list[dict]:
    """Gradient bytes per step of the GPU presets' networks and the ring all-reduce time per link and size."""
    rows = []
    for name in ("gpu", "gpu-3d"):
        network = build_network(get_preset(name), n_classes=2)
        parameters = sum(p.numel() for p in network.parameters())
        megabytes = parameters * 4 / 1e6  # fp32 gradients (clipping and noise stay fp32)
        for link, gb_s in LINKS_GB_S.items():
            for world in (2, 4, 8):
                seconds = 2 * (world - 1) / world * megabytes / 1e3 / gb_s
                row = {"preset": name, "parameters": parameters, "MB": megabytes, "link": link, "W": world}
                rows.append({**row, "ms": seconds * 1e3})
    return rows


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    runs = [
        train_run(args.store, args.out / "multi", args.preset, args.steps, args.nproc, max(1, cores // args.nproc)),
        train_run(args.store, args.out / "single", args.preset, args.steps, None, cores),
    ]
    print(f"{machine_header()}; {args.preset}, {args.steps} steps")
    print("\n| processes × threads | s per DP step | wall (incl. start-up) |\n| --- | --- | --- |")
    for r in runs:
        print(f"| {r['processes']} × {r['threads_each']} | {r['s_per_step']:.3f} | {r['wall_s']:.1f} s |")
    print("\n| preset | parameters | MB all-reduced per step | link | W | ms per all-reduce |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in allreduce_rows():
        print(f"| {r['preset']} | {r['parameters']:,} | {r['MB']:.1f} | {r['link']} | {r['W']} | {r['ms']:.2f} |")
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
