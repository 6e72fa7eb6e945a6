"""Every benchmark script imports (so a refactor cannot break one silently) without running it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").rglob("bench_*.py"))


def test_there_are_benchmarks_each_in_the_folder_of_its_kind() -> None:
    assert len(BENCHMARKS) >= 10
    assert {script.parent.name for script in BENCHMARKS} == {"perf", "privacy", "experiments"}


def _load(script: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/KIND/bench_x.py` puts its folder first
    spec = importlib.util.spec_from_file_location(f"bench_import_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import does (dataclasses look their module up)
    spec.loader.exec_module(module)  # runs module-level code only: main() stays behind `if __name__ == "__main__"`
    return module


def test_the_recipe_table_is_checked_against_the_preset_fields(tmp_path: Path, monkeypatch) -> None:
    utility = _load(next(s for s in BENCHMARKS if s.stem == "bench_utility"), monkeypatch)
    assert utility.RECIPES["min-snr"] == {
        "preset": "cpu-small",
        "timestep_sampling": "logit-normal",
        "loss_weighting": "min-snr",
    }
    for bad, reason in [
        ('["x"]\npreset = "cpu-small"\nloss_weigting = "min-snr"\n', "unknown fields \\['loss_weigting'\\]"),
        ('["x"]\npreset = "cpu-huge"\n', "preset 'cpu-huge'"),
        ('["x"]\npreset = "cpu-small"\nloss_weighting = "max-snr"\n', "unknown loss weighting"),
    ]:
        (tmp_path / "recipes.toml").write_text(bad)
        with pytest.raises(Exception, match=reason):
            utility.load_recipes(tmp_path / "recipes.toml")


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.stem)
def test_a_benchmark_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(script, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
    assert (module.__doc__ or "").strip(), f"{script.name} has no docstring naming its command"


def test_the_map_is_drawn_from_every_recorded_cell(tmp_path: Path, monkeypatch) -> None:
    """Cells recorded by separate invocations land in one table; a cell without a run says so."""
    draw = _load(next(s for s in BENCHMARKS if s.stem == "bench_map"), monkeypatch)
    rows = [
        {"cell": {"patients_estimate": 800, "epsilon": 8.0, "compute": 1.0}, "ratio": 0.6, "fd_filter": 27.0},
        {"recipe": "not a grid row", "ratio": 0.1},
        {"cell": {"patients_estimate": 800, "epsilon": 1.0, "compute": 1.0}, "ratio": 0.52, "fd_filter": 90.0},
    ]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    second.write_text(json.dumps(rows[2]) + "\n\n")
    table = draw.grid_table(draw.load_rows([first, second]))
    assert "| 800 | 1× | 0.520 (90.0) | 0.600 (27.0) |" in table
    rows[0]["cell"]["compute"] = 4.0
    first.write_text(json.dumps(rows[0]) + "\n")
    assert "| 800 | 4× | not run | 0.600 (27.0) |" in draw.grid_table(draw.load_rows([first, second]))
