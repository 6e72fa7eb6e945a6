"""Latency of the REST service under a fixed request rate while a generation job runs.

    .venv/bin/python benchmarks/perf/bench_api_latency.py --models demo/models --rate 100 --seconds 20

Starts `synthcohort serve` on 127.0.0.1 with a fresh data directory, creates a key, starts a large cohort
job, then sends GET /v1/models and GET /v1/cohorts/{id} alternately at a fixed rate (open loop: requests
are sent on schedule whether or not earlier ones finished, from a thread pool) and reports p50/p99.
Traffic goes to 127.0.0.1 only and stops after --seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo/models", help="directory with one bundle per subdirectory")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--job-samples", type=int, default=2000)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="synthcohort-latency-")
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": data}
    key = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create"], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--models", args.models, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(headers=headers, timeout=10)
        model = client.get(f"{base}/v1/models").json()[0]
        label = next(iter(model["labels"]))
        job = client.post(f"{base}/v1/cohorts", json={"model": model["id"], "counts": {label: args.job_samples}}).json()
        time.sleep(2.0)  # let the job start generating
        urls = [f"{base}/v1/models", f"{base}/v1/cohorts/{job['id']}"]
        latencies: dict[str, list[float]] = {u: [] for u in urls}

        def hit(url: str) -> None:
            start = time.perf_counter()
            response = client.get(url)
            response.raise_for_status()
            latencies[url].append(time.perf_counter() - start)

        n = int(args.rate * args.seconds)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:
            for i in range(n):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(hit, urls[i % 2])
        status = client.get(urls[1]).json()["status"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{machine_header()}; {args.rate:.0f} req/s for "
        f"{args.seconds:.0f} s while a {args.job_samples}-sample job ran (job status at the end: {status})\n"
    )
    print("| route | requests | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for url, name in zip(urls, ("GET /v1/models", "GET /v1/cohorts/{id}"), strict=True):
        ms = np.array(latencies[url]) * 1000
        print(f"| {name} | {len(ms)} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} | {ms.max():.1f} |")


if __name__ == "__main__":
    main()
