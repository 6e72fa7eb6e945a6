"""Many researchers at once: each requests a small cohort, polls it to the end and reads its manifest.

    .venv/bin/python benchmarks/bench_api_load.py --models demo/models --researchers 200 --apis 2 --workers 2 \
        --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Starts ``--apis`` API processes (``serve --no-worker``) and ``--workers`` job workers on one database (a fresh
PostgreSQL database created and dropped by the run; without ``--db``, one embedded ``serve`` on SQLite) and a
fresh data directory; creates one key per simulated researcher; then every researcher, concurrently (asyncio),
lists the models, posts a cohort of ``--samples`` samples through an API chosen round-robin, polls its status
every ``--poll`` seconds until it finishes, and fetches the manifest. Reports latency percentiles per route,
jobs finished per minute, and every non-2xx answer. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_postgres(admin_url: str) -> tuple[str, callable]:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"synthcohort_load_{uuid.uuid4().hex[:8]}"
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return f"{admin_url.rsplit('/', 1)[0]}/{name}", drop


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_healthy(base: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} did not start")


async def researcher(client: httpx.AsyncClient, base: str, key: str, samples: int, poll: float, stats: dict) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    async def call(route: str, method: str, url: str, **kw) -> httpx.Response:
        t0 = time.perf_counter()
        response = await client.request(method, url, headers=headers, **kw)
        stats["latency"][route].append(time.perf_counter() - t0)
        stats["status"][(route, response.status_code)] += 1
        return response

    models = (await call("GET /v1/models", "GET", f"{base}/v1/models")).json()
    model = models[0]
    label = next(iter(model["labels"]))
    body = {"model": model["id"], "counts": {label: samples}}
    job = (await call("POST /v1/cohorts", "POST", f"{base}/v1/cohorts", json=body)).json()
    while True:
        await asyncio.sleep(poll)
        status = (await call("GET /v1/cohorts/{id}", "GET", f"{base}/v1/cohorts/{job['id']}")).json()
        if status.get("status") not in ("queued", "running"):
            break
    stats["outcome"][status.get("status")] += 1
    if status.get("status") == "succeeded":
        await call("GET /v1/datasets/{id}", "GET", f"{base}/v1/datasets/{job['id']}")
        stats["finished_at"].append(time.perf_counter())


async def run_load(bases: list[str], keys: list[str], samples: int, poll: float) -> dict:
    stats = {"latency": defaultdict(list), "status": Counter(), "outcome": Counter(), "finished_at": []}
    limits = httpx.Limits(max_connections=len(keys), max_keepalive_connections=len(keys))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        stats["start"] = time.perf_counter()
        await asyncio.gather(
            *(researcher(client, bases[i % len(bases)], k, samples, poll, stats) for i, k in enumerate(keys))
        )
        stats["end"] = time.perf_counter()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="directory with one bundle per subdirectory")
    parser.add_argument("--researchers", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4, help="samples per cohort request")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between a researcher's status polls")
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--db", default=None, help="PostgreSQL maintenance-database URL (default: embedded SQLite)")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="synthcohort-load-"))
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(data)}
    drop = None
    if args.db:
        env["SYNTHCOHORT_DB_URL"], drop = fresh_postgres(args.db)
        subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    procs: list[subprocess.Popen] = []
    try:
        from app.db import session_factory
        from app.keys import create_key
        from app.settings import Settings

        with session_factory(Settings(data_dir=data, db_url=env.get("SYNTHCOHORT_DB_URL")))() as session:
            keys = [create_key(session, role="researcher")[1] for _ in range(args.researchers)]
        ports = [free_port() for _ in range(args.apis if args.db else 1)]
        api_args = ["--no-worker"] if args.db else []
        for port in ports:
            procs.append(start(["serve", "--models", str(args.models), "--port", str(port), *api_args], env))
        if args.db:
            procs += [start(["worker", "--models", str(args.models)], env) for _ in range(args.workers)]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        for base in bases:
            wait_healthy(base)
        stats = asyncio.run(run_load(bases, keys, args.samples, args.poll))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
        if drop:
            drop()

    seconds = stats["end"] - stats["start"]
    setup = f"{len(ports)} API + {args.workers} workers on PostgreSQL" if args.db else "one embedded serve on SQLite"
    print(f"# {date.today()}, {platform.node()}, {os.cpu_count()} CPUs; {setup}")
    print(f"{args.researchers} researchers × {args.samples} samples, polling every {args.poll} s: {seconds:.1f} s")
    print(f"jobs: {dict(stats['outcome'])}; {len(stats['finished_at']) / seconds * 60:.1f} finished per minute")
    print("| route | requests | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for route, values in sorted(stats["latency"].items()):
        ms = np.asarray(values) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(f"| {route} | {len(ms)} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {ms.max():.1f} |")
    errors = {f"{route} {code}": n for (route, code), n in stats["status"].items() if code >= 300}
    print(f"non-2xx answers: {errors or 'none'}")


if __name__ == "__main__":
    main()
