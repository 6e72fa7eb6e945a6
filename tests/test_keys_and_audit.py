"""API keys and the audit log on a real SQLite database, through the library and the CLI."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.db import audit_events, record_event, session_factory
from app.keys import create_key, verify_key
from app.settings import Settings
from generators.errors import InvalidInput


@pytest.fixture
def sessions(tmp_path: Path):
    return session_factory(Settings(data_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'test.db'}"))


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
    raw = (tmp_path / "test.db").read_bytes()
    assert secret.encode() not in raw and token.encode() not in raw  # only the digest is stored
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
