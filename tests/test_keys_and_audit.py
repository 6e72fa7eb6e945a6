"""API keys, the audit log and schema migrations on real databases (SQLite and PostgreSQL), through the library
and the CLI."""

import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import fresh_database
from sqlalchemy import select

from app.db import ApiKey, Job, SchemaOutOfDate, UiSession, audit_events, record_event, session_factory, utcnow
from app.keys import create_key, verify_key
from app.settings import Settings
from generators.errors import InvalidInput


@pytest.fixture
def sessions(db_url: str, tmp_path: Path):
    return session_factory(Settings(data_dir=tmp_path, db_url=db_url))


def _all_rows(sessions) -> str:
    """Every value of every table, as text (what someone holding a database dump would read)."""
    from app.db import Base

    with sessions() as session:
        return repr([session.execute(table.select()).all() for table in Base.metadata.sorted_tables])


def test_keys_are_hashed_and_verified(sessions, tmp_path: Path) -> None:
    with sessions() as session:
        row, token = create_key(session, role="researcher", quota_samples_per_day=500)
        assert verify_key(session, token).id == row.id
        assert verify_key(session, token + "x") is None
        assert verify_key(session, "sck_" + row.prefix + "_wrong") is None
        assert verify_key(session, "Bearer nonsense") is None
        secret = token.split("_", 2)[2]
        row.revoked = True
        session.commit()
        assert verify_key(session, token) is None
    dump = _all_rows(sessions)
    assert row.prefix in dump and secret not in dump and token not in dump  # only the digest is stored
    with sessions() as session, pytest.raises(InvalidInput, match="role"):
        create_key(session, role="root")


def test_audit_log_orders_newest_first(sessions) -> None:
    with sessions() as session:
        record_event(session, action="cohort.create", outcome="queued", model="demo", counts={"lesion": 3})
        record_event(session, action="cohort.create", outcome="succeeded", model="demo", dataset_id="d1")
        events = audit_events(session)
    assert [e.outcome for e in events] == ["succeeded", "queued"]
    assert events[1].counts == {"lesion": 3}


def test_cli_commands_share_the_settings_database(tmp_path: Path) -> None:
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(tmp_path / "data")}
    created = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--role", "admin", "--quota-samples-per-day", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("sck_") and "cannot be shown again" in created.stderr
    listed = subprocess.run([sys.executable, "-m", "app.cli", "keys", "list"], capture_output=True, text=True, env=env)
    assert token.split("_")[1] in listed.stdout and token.split("_", 2)[2] not in listed.stdout
    log = subprocess.run([sys.executable, "-m", "app.cli", "audit-log"], capture_output=True, text=True, env=env)
    assert "key.create" in log.stdout and "ok" in log.stdout
    with sqlite3.connect(tmp_path / "data" / "synthcohort.db") as db:
        assert db.execute("select role, quota_samples_per_day from api_keys").fetchall() == [("admin", 10)]
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--role", "root"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "unknown role" in bad.stderr


def test_keys_expire_and_revoke_through_the_cli(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(tmp_path / "data"), "SYNTHCOHORT_DB_URL": db_url}
    sessions = session_factory(Settings(data_dir=tmp_path, db_url=db_url))
    with sessions() as session:
        _, expired = create_key(session, role="researcher", expires_days=1)
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == expired.split("_")[1]))
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        assert verify_key(session, expired) is None
        with pytest.raises(InvalidInput, match="expires"):
            create_key(session, role="researcher", expires_days=-1)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env)

    created = cli("keys", "create", "--expires-days", "30")
    assert created.returncode == 0 and "valid until" in created.stderr
    token = created.stdout.strip()
    with sessions() as session:
        assert verify_key(session, token) is not None
    assert cli("keys", "revoke", token.split("_")[1]).returncode == 0
    with sessions() as session:
        assert verify_key(session, token) is None
    listed = cli("keys", "list").stdout
    assert "revoked" in listed and "expired" in listed
    unknown = cli("keys", "revoke", "nope")
    assert unknown.returncode == 3 and "no key" in unknown.stderr  # NotFound


def test_upgrading_an_old_database_keeps_its_keys_jobs_and_log(backend: str, tmp_path: Path) -> None:
    """A database made before migrations existed (the first schema, no version table) is upgraded in place;
    a PostgreSQL database behind the code is refused until `synthcohort db upgrade` runs."""
    from alembic import command
    from sqlalchemy import text

    from app.db import alembic_config, engine_for, head_revision, make_engine, revision_of, upgrade

    with fresh_database(backend, tmp_path) as url:
        engine = make_engine(url)
        with engine.begin() as connection:  # back to the first schema, then forget the version table
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
            connection.execute(text("DROP TABLE alembic_version"))
            connection.execute(
                text(
                    "INSERT INTO api_keys (id, prefix, digest, role, created_at, revoked) "
                    "VALUES (1, 'abc', 'd', 'admin', '2026-01-01 00:00:00', false)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO jobs (id, key_id, model, counts, seed, formats, status, progress, generated, "
                    "rejected, accepted, created_at, updated_at) VALUES ('j1', 1, 'demo', '{\"a\": 1}', 7, "
                    "'[\"nifti\"]', 'succeeded', 1.0, 1, 0, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                )
            )
            connection.execute(
                text("INSERT INTO audit_log (at, key_id, action, outcome) VALUES ('2026-01-01 00:00:00', 1, 'x', 'ok')")
            )
        assert revision_of(engine) == "0001"
        engine_for.cache_clear()
        env = {**os.environ, "SYNTHCOHORT_DATA_DIR": str(tmp_path / "data"), "SYNTHCOHORT_DB_URL": url}
        if backend == "postgresql":
            with pytest.raises(SchemaOutOfDate, match="db upgrade"):
                engine_for(url)
            done = subprocess.run(
                [sys.executable, "-m", "app.cli", "db", "upgrade"], capture_output=True, text=True, env=env
            )
            assert done.returncode == 0 and f"0001 -> {head_revision()}" in done.stderr, done.stderr
        sessions = session_factory(Settings(data_dir=tmp_path, db_url=url))  # SQLite: upgraded on opening
        with sessions() as session:
            assert [k.prefix for k in session.scalars(select(ApiKey))] == ["abc"]
            job = session.get(Job, "j1")
            assert job.counts == {"a": 1} and job.status == "succeeded" and job.covariates is None  # 0004
            job.seed = 2**62  # the API's largest seed: 64-bit since 0002
            session.commit()
            assert session.get(Job, "j1").seed == 2**62
            assert [e.action for e in audit_events(session)] == ["x"]
            assert session.scalars(select(UiSession)).all() == []  # 0005: web sessions start empty
            assert session.scalars(select(ApiKey.last_request_at)).all() == [None]  # 0006: no request charged yet
        assert head_revision() == "0006" and upgrade(url) == ("0006", "0006")
        current = subprocess.run(
            [sys.executable, "-m", "app.cli", "db", "current"], capture_output=True, text=True, env=env
        )
        assert current.stdout.startswith("0006")
        engine.dispose()
        engine_for.cache_clear()
