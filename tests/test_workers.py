"""API processes and worker processes apart, on one PostgreSQL database and one dataset directory: every job runs
to the end exactly once, also when a worker is killed in the middle of one; a job whose storage fails fails
cleanly."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import fresh_database
from sqlalchemy import create_engine, text
from test_api import free_port, make_models, new_key, running_server, service_env, start_server, wait_for

pytestmark = pytest.mark.postgres  # every test here runs API and worker processes on one PostgreSQL


def start_worker(models: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--models", str(models)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_two_apis_and_two_workers_run_every_job_once_when_a_worker_dies(tiny_model: Path, tmp_path: Path) -> None:
    models = make_models(tiny_model, tmp_path)
    with fresh_database("postgresql", tmp_path) as url:
        env = service_env(tmp_path, url)
        headers = {"Authorization": f"Bearer {new_key(env, '--role', 'researcher')}"}
        ports = [free_port(), free_port()]
        apis = [start_server(models, env, port, "--no-worker") for port in ports]
        workers = [start_worker(models, env), start_worker(models, env)]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        database = create_engine(url)
        try:
            jobs = []
            for i in range(6):  # through both APIs, in turn
                body = {"model": "demo", "counts": {"healthy": 24, "lesion": 24}, "seed": i}
                created = httpx.post(f"{bases[i % 2]}/v1/cohorts", headers=headers, json=body)
                assert created.status_code == 202, created.text
                jobs.append(created.json()["id"])

            # kill -9 the first worker once it holds a job it has made progress on
            victim, deadline = workers[0], time.time() + 180
            while time.time() < deadline:
                with database.connect() as connection:
                    held = connection.execute(
                        text("select count(*) from jobs where lease_owner like :me and accepted > 0"),
                        {"me": f"%:{victim.pid}:%"},
                    ).scalar()
                if held:
                    break
                time.sleep(0.05)
            assert held, "the first worker never made progress on a job"
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)

            datasets = tmp_path / "data" / "datasets"
            for i, job_id in enumerate(jobs):
                finished = wait_for(bases[(i + 1) % 2], headers, job_id)  # polled through the other API
                assert finished["status"] == "succeeded" and finished["done"] == 48, finished
                manifest = json.loads((datasets / job_id / "manifest.json").read_text())
                seeds = [s["seed"] for s in manifest["samples"]]
                assert len(seeds) == 48 and len(set(seeds)) == 48  # no duplicate, no missing sample
                assert len(list((datasets / job_id).rglob("*.nii.gz"))) == 48
            assert not list(datasets.glob(".*.partial"))  # no half dataset left anywhere
            with database.connect() as connection:
                finishes = connection.execute(
                    text("select dataset_id, outcome from audit_log where action = 'cohort.finish'")
                ).all()
            assert sorted(finishes) == sorted((job_id, "succeeded") for job_id in jobs)  # each exactly once

            # a key revoked through one API is refused at once by the other
            admin = {"Authorization": f"Bearer {new_key(env, '--role', 'admin')}"}
            prefix = headers["Authorization"].split("_")[1]
            assert httpx.post(f"{bases[0]}/v1/keys/{prefix}/revoke", headers=admin).status_code == 200
            assert httpx.get(f"{bases[1]}/v1/models", headers=headers).status_code == 401
        finally:
            for proc in [*apis, *workers]:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=60)
            database.dispose()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs for the datasets (needs root, as on CI machines; skipped with the reason elsewhere)."""
    disk = tmp_path / "data" / "datasets"
    disk.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()[:100]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_job_that_fills_the_disk_fails_cleanly_and_the_service_keeps_serving(
    tiny_model: Path, small_disk: Path, tmp_path: Path
) -> None:
    """The dataset storage fills up mid-job: the job fails with a plain reason and leaves nothing; the server
    keeps serving, and a job that fits still succeeds."""
    models = make_models(tiny_model, tmp_path)
    with fresh_database("postgresql", tmp_path) as url:  # the database is not on the full disk
        env = service_env(tmp_path, url)
        headers = {"Authorization": f"Bearer {new_key(env, '--role', 'researcher')}"}
        with running_server(models, env) as base:
            big = httpx.post(f"{base}/v1/cohorts", headers=headers, json={"model": "demo", "counts": {"lesion": 480}})
            failed = wait_for(base, headers, big.json()["id"])
            assert failed["status"] == "failed" and "storage full or not writable" in failed["error"], failed
            assert str(tmp_path) not in failed["error"]
            assert list(small_disk.iterdir()) == []  # no dataset, no partial directory
            assert httpx.get(f"{base}/v1/datasets/{failed['id']}", headers=headers).status_code == 404
            assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 200
            small = httpx.post(f"{base}/v1/cohorts", headers=headers, json={"model": "demo", "counts": {"lesion": 2}})
            assert wait_for(base, headers, small.json()["id"])["status"] == "succeeded"
