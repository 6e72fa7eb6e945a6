"""The import direction app → (train, privacy_filters) → generators holds in every module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "train", "privacy_filters", "generators")
FORBIDDEN = {
    "generators": {"app", "train", "privacy_filters"},
    "train": {"app", "privacy_filters"},
    "privacy_filters": {"app", "train"},
    "app": set(),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_no_reverse_imports(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"package {package} has no modules"
    offenders = {
        str(m.relative_to(ROOT)): sorted(imported_packages(m) & FORBIDDEN[package])
        for m in modules
        if imported_packages(m) & FORBIDDEN[package]
    }
    assert offenders == {}, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_checker_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import app.cli\nfrom train.store import CohortStore\ndef f():\n    import privacy_filters\n")
    assert imported_packages(module) == {"app", "train", "privacy_filters"}


def test_presets_and_the_cli_entry_point_import_without_torch() -> None:
    """A bad train flag (preset, recipe choice) or cohort request (read against the model's card) is refused before
    torch is imported: these stay light."""
    modules = "app.cli, train.presets, generators.card, app.cohort_spec"
    code = f"import sys, {modules}; print(sorted({{'torch', 'diffusers', 'opacus'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
