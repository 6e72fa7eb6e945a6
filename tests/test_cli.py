"""The real ``synthcohort`` executable: exit codes, messages, no identifiers in its output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import exit_code_for
from app.settings import Settings, get_settings
from generators.errors import Conflict, InvalidInput, NotFound, PrivacyPolicy, SynthCohortError

# the real entry point (app.cli.main), which then says on stderr which of the scan readers' libraries it imported
PROBE = """import sys
from app.cli import main
try:
    main()
finally:
    print("scan readers imported:", sorted({"torch", "nibabel", "pydicom"} & set(sys.modules)), file=sys.stderr)
"""


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_is_fast_and_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo-data", "ingest", "info", "export", "serve", "audit"):
        assert command in result.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, app.cli; print('torch' in sys.modules, {'nibabel', 'matplotlib'} & set(sys.modules) != set())",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "False False"


@pytest.mark.slow
def test_ingest_cli_end_to_end_and_errors(demo_raw, tmp_path: Path) -> None:
    raw, plan = demo_raw
    out = tmp_path / "store"
    args = ("ingest", str(raw), "--labels", str(raw / "labels.csv"), "--out", str(out), "--size", "16", "--slices", "2")
    undeclared = run_cli(*args)
    assert undeclared.returncode == 2 and "--declare-labels healthy,lesion" in undeclared.stderr
    assert "scan readers imported: []" in undeclared.stderr  # refused before torch, nibabel, pydicom load
    rare = run_cli(*args, "--declare-labels", "healthy,lesion")  # 8 patients a label: under the default 20
    assert rare.returncode == 2 and "fewer than 20 patients" in rare.stderr and not out.exists()
    ok = run_cli(*args, "--declare-labels", "healthy,lesion", "--min-label-patients", "5")
    assert ok.returncode == 0, ok.stderr
    assert "train" in ok.stdout and "holdout" in ok.stdout
    for p in plan:  # nothing identifying is printed
        assert p.patient_id not in ok.stdout + ok.stderr
        assert p.name.split("^")[0] not in ok.stdout + ok.stderr

    again = run_cli(*args, "--declare-labels", "healthy,lesion")
    assert again.returncode == exit_code_for(Conflict("x")) == 4
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert "scan readers imported: []" in again.stderr

    missing = run_cli("info", str(tmp_path / "nope"))
    assert missing.returncode == 3 and "no cohort store" in missing.stderr

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "MRN1234567.nii").write_bytes(b"junk")
    junk = ("ingest", str(tmp_path / "junk"), "--labels", str(raw / "labels.csv"), "--declare-labels", "healthy,lesion")
    bad = run_cli(*junk, "--out", str(tmp_path / "s2"))
    assert bad.returncode == 2 and "nothing usable" in bad.stderr
    assert "MRN1234567" not in bad.stderr  # paths are shown only with --show-paths
    shown = run_cli(*junk, "--out", str(tmp_path / "s2"), "--show-paths")
    assert shown.returncode == 2 and "MRN1234567.nii: unreadable NIfTI" in shown.stderr

    flag = run_cli(
        "ingest", str(raw), "--labels", str(raw / "labels.csv"), "--out", str(tmp_path / "s3"), "--size", "3"
    )
    assert flag.returncode == 2 and "--size" in flag.stderr


def test_exit_codes_are_distinct() -> None:
    codes = [exit_code_for(e("x")) for e in (InvalidInput, NotFound, Conflict, PrivacyPolicy, SynthCohortError)]
    assert codes == [2, 3, 4, 5, 1]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYNTHCOHORT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTHCOHORT_WORKERS", "3")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert settings.data_dir == tmp_path and settings.workers == 3
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("SYNTHCOHORT_WORKERS", "0")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.slow
def test_train_rejects_a_timestep_mean_it_would_ignore(tmp_path: Path) -> None:
    out = tmp_path / "model"
    args = ("train", str(tmp_path / "store"), "--out", str(out), "--epsilon", "8", "--timestep-mean", "1")
    ignored = run_cli(*args, "--timestep-sampling", "uniform")
    assert ignored.returncode == 2 and "logit-normal timestep sampling only" in ignored.stderr
    extreme = run_cli(*args[:-1], "5")
    assert extreme.returncode == 2 and "[-3, 3]" in extreme.stderr
    assert not out.exists()
