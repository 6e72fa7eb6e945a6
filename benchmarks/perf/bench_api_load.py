"""Many researchers at once while cohort jobs run: latency per route, errors, API memory over time.

    .venv/bin/python benchmarks/perf/bench_api_load.py --models MODELS_DIR --researchers 200 --seconds 600 \
        --db postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Starts ``--apis`` API processes (``serve --no-worker``) and ``--workers`` job workers on a fresh PostgreSQL
database (created and dropped by the run; without ``--db``: one embedded ``serve`` on SQLite) and a fresh data
directory, and one key per simulated researcher. Warm-up: every researcher requests a small cohort and waits for
it. Then ``--big-jobs`` large cohort jobs start, and for ``--seconds`` every researcher loops, concurrently
(asyncio): list the models, poll its job, read its dataset's manifest, download one of its files, wait
``--think`` seconds. Reports p50/p95/p99 per route for the loop, the non-2xx answers (target: no 5xx), and each
API process's resident memory at the start and the end of the loop (target: growth ≤ 10 %). Traffic goes to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

ACTIVE = ("queued", "running")


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


RESETS = Counter()  # connections closed or reset under a reused GET (retried once), by resource


async def request(client: httpx.AsyncClient, method: str, url: str, **kw) -> httpx.Response:
    """One request; a GET on a keep-alive connection the server has just closed is retried once, as any
    HTTP client does (uvicorn closes idle connections after 5 s)."""
    try:
        return await client.request(method, url, **kw)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        if method != "GET":
            raise
        RESETS[url.split("/v1/")[-1].split("/")[0]] += 1
        return await client.request(method, url, **kw)


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: Counter[tuple[str, int]] = Counter()

    async def call(self, client: httpx.AsyncClient, route: str, method: str, url: str, **kw) -> httpx.Response:
        t0 = time.perf_counter()
        response = await request(client, method, url, **kw)
        self.latency[route].append(time.perf_counter() - t0)
        self.status[(route, response.status_code)] += 1
        return response


async def warm_up(client: httpx.AsyncClient, base: str, headers: dict, samples: int) -> tuple[str, str]:
    """Request a small cohort and wait for it: ``(job id, one of its files)``."""
    listed = await request(client, "GET", f"{base}/v1/models", headers=headers)
    if listed.status_code != 200:
        raise SystemExit(f"warm-up: GET /v1/models answered {listed.status_code}: {listed.text[:300]}")
    model = listed.json()[0]
    body = {"model": model["id"], "counts": {next(iter(model["labels"])): samples}}
    job = (await client.post(f"{base}/v1/cohorts", headers=headers, json=body)).json()
    while (await request(client, "GET", f"{base}/v1/cohorts/{job['id']}", headers=headers)).json()["status"] in ACTIVE:
        await asyncio.sleep(1.0)
    manifest = (await request(client, "GET", f"{base}/v1/datasets/{job['id']}", headers=headers)).json()["manifest"]
    return job["id"], manifest["samples"][0]["file"]


async def researcher(
    client: httpx.AsyncClient, base: str, headers: dict, job: tuple[str, str], until: float, think: float, stats: Stats
) -> None:
    job_id, file = job
    while time.perf_counter() < until:
        await stats.call(client, "GET /v1/models", "GET", f"{base}/v1/models", headers=headers)
        await stats.call(client, "GET /v1/cohorts/{id}", "GET", f"{base}/v1/cohorts/{job_id}", headers=headers)
        await stats.call(client, "GET /v1/datasets/{id}", "GET", f"{base}/v1/datasets/{job_id}", headers=headers)
        url = f"{base}/v1/datasets/{job_id}/files/{file}"
        await stats.call(client, "GET /v1/datasets/{id}/files/{name}", "GET", url, headers=headers)
        await asyncio.sleep(think)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_load(args, bases: list[str], keys: list[str], admin: str, apis: list[int]) -> dict:
    limits = httpx.Limits(max_connections=len(keys) + 8, max_keepalive_connections=len(keys) + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        headers = [{"Authorization": f"Bearer {k}"} for k in keys]
        jobs = await asyncio.gather(
            *(warm_up(client, bases[i % len(bases)], h, args.samples) for i, h in enumerate(headers))
        )
        admin_headers = {"Authorization": f"Bearer {admin}"}
        model = (await request(client, "GET", f"{bases[0]}/v1/models", headers=admin_headers)).json()[0]
        big = {"model": model["id"], "counts": {next(iter(model["labels"])): args.big_samples}}
        for _ in range(args.big_jobs):
            await client.post(f"{bases[0]}/v1/cohorts", headers={"Authorization": f"Bearer {admin}"}, json=big)
        memory_start = [rss_mb(pid) for pid in apis]
        stats = Stats()
        until = time.perf_counter() + args.seconds
        await asyncio.gather(
            *(
                researcher(client, bases[i % len(bases)], h, jobs[i], until, args.think, stats)
                for i, h in enumerate(headers)
            )
        )
        memory_end = [rss_mb(pid) for pid in apis]
    return {"stats": stats, "memory": list(zip(memory_start, memory_end, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="directory with one bundle per subdirectory")
    parser.add_argument("--researchers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the measured loop")
    parser.add_argument("--think", type=float, default=1.0, help="seconds a researcher waits between loops")
    parser.add_argument("--samples", type=int, default=2, help="samples of each researcher's warm-up cohort")
    parser.add_argument("--big-jobs", type=int, default=4)
    parser.add_argument("--big-samples", type=int, default=5000)
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
            admin = create_key(session, role="admin")[1]
        ports = [free_port() for _ in range(args.apis if args.db else 1)]
        api_args = ["--no-worker"] if args.db else []
        apis = [start(["serve", "--models", str(args.models), "--port", str(p), *api_args], env) for p in ports]
        procs += apis
        if args.db:
            procs += [start(["worker", "--models", str(args.models)], env) for _ in range(args.workers)]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        for base in bases:
            wait_healthy(base)
        result = asyncio.run(run_load(args, bases, keys, admin, [p.pid for p in apis]))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=300)
        if drop:
            drop()
    report(args, result, len(ports))


def report(args, result: dict, n_apis: int) -> None:
    stats = result["stats"]
    setup = f"{n_apis} API + {args.workers} workers on PostgreSQL" if args.db else "one embedded serve on SQLite"
    print(f"# {machine_header()}; {setup}")
    print(
        f"{args.researchers} researchers, {args.seconds:.0f} s loop (models, job, manifest, one file; "
        f"{args.think} s think time) while {args.big_jobs} jobs of {args.big_samples} samples run"
    )
    print("| route | requests | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for route, values in sorted(stats.latency.items()):
        ms = np.asarray(values) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(f"| {route} | {len(ms)} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {ms.max():.1f} |")
    errors = {f"{route} {code}": n for (route, code), n in stats.status.items() if code >= 300}
    print(f"non-2xx answers: {errors or 'none'}; 5xx: {sum(n for (_, c), n in stats.status.items() if c >= 500)}")
    print(f"keep-alive connections closed under a reused request (retried once): {dict(RESETS) or 'none'}")
    for i, (start_mb, end_mb) in enumerate(result["memory"]):
        print(
            f"API {i} resident memory: {start_mb:.0f} MB at the start, {end_mb:.0f} MB at the end "
            f"({(end_mb / start_mb - 1) * 100:+.1f} %)"
        )


if __name__ == "__main__":
    main()
