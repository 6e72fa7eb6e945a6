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


def test_the_grid_plans_every_cell_of_its_flags(tmp_path: Path, monkeypatch) -> None:
    utility = _load(next(s for s in BENCHMARKS if s.stem == "bench_utility"), monkeypatch)
    argv = ["bench_utility.py", "--store", str(tmp_path), "--out", str(tmp_path), "--grid", "--recipe", "min-snr"]
    monkeypatch.setattr(sys, "argv", [*argv, "--grid-epsilon", "8,inf", "--grid-compute", "1,4"])
    cells = utility.plan_cells(utility.parse_args())
    assert sorted((c.epsilon or 0.0, c.compute) for c in cells) == [(0.0, 1.0), (0.0, 4.0), (8.0, 1.0), (8.0, 4.0)]
    assert {c.name(True, 1) for c in cells} >= {f"min-snr/{tmp_path.name}/nodp/4x", f"min-snr/{tmp_path.name}/eps8/1x"}


def test_the_map_is_drawn_from_every_recorded_cell(tmp_path: Path, monkeypatch) -> None:
    """Cells recorded by separate invocations land in one table; a cell without a run says so."""
    draw = _load(next(s for s in BENCHMARKS if s.stem == "bench_map"), monkeypatch)
    rows = [
        {
            "recipe": "a",
            "cell": {"patients_estimate": 800, "epsilon": 8.0, "compute": 1.0},
            "ratio": 0.6,
            "fd_filter": 27.0,
        },
        {"recipe": "not a grid row", "ratio": 0.1},
        {
            "recipe": "a",
            "cell": {"patients_estimate": 800, "epsilon": 1.0, "compute": 1.0},
            "ratio": 0.52,
            "fd_filter": 90.0,
        },
        {
            "recipe": "b",
            "cell": {"patients_estimate": 800, "epsilon": 8.0, "compute": 1.0},
            "ratio": 0.7,
            "fd_filter": 20.0,
        },
    ]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    second.write_text(json.dumps(rows[2]) + "\n\n" + json.dumps(rows[3]) + "\n")
    table = draw.grid_table(draw.load_rows([first, second]))
    assert "| a | 800 | 1× | 0.520 (90.0) | 0.600 (27.0) |" in table
    assert "| b | 800 | 1× | not run | 0.700 (20.0) |" in table  # another recipe: its own line
    rows[0]["cell"]["compute"] = 4.0
    first.write_text(json.dumps(rows[0]) + "\n")
    table = draw.grid_table(draw.load_rows([first, second]))
    assert "| a | 800 | 4× | not run | 0.600 (27.0) |" in table
    assert "| a | 800 | 1× | 0.520 (90.0) | not run |" in table


def test_the_map_keeps_the_two_tstr_protocols_apart(monkeypatch) -> None:
    """A cell scored only with n per label (--small-tstr-only) is not drawn as a fair-protocol cell, and the
    small-n map reads each row's small-n number."""
    draw = _load(next(s for s in BENCHMARKS if s.stem == "bench_map"), monkeypatch)
    both = {"recipe": "a", "cell": {"patients_estimate": 800, "epsilon": 8.0, "compute": 1.0}, "fd_filter": 30.0}
    both |= {"tstr_protocol": "fair", "ratio": 0.55, "ratio_small_n": 0.57}
    small_only = {"recipe": "a", "cell": {"patients_estimate": 8000, "epsilon": 8.0, "compute": 1.0}}
    small_only |= {"tstr_protocol": "n per label", "ratio": 0.66, "fd_filter": 12.0}
    fair = draw.grid_table([both, small_only], "fair")
    assert "| a | 800 | 1× | 0.550 (30.0) |" in fair
    assert "8000" not in fair
    small = draw.grid_table([both, small_only], "small")
    assert "| a | 800 | 1× | 0.570 (30.0) |" in small
    assert "| a | 8000 | 1× | 0.660 (12.0) |" in small


def test_the_gpu_benchmark_records_a_failing_measurement_and_goes_on(monkeypatch, capsys) -> None:
    """A GPU session is short: one measurement that fails (a compiler, memory) is one error row, printed at once,
    and the next measurement still runs."""
    gpu = _load(next(s for s in BENCHMARKS if s.stem == "bench_gpu"), monkeypatch)
    rows = gpu.Rows()

    def fails() -> dict:
        raise RuntimeError("CUDA out of memory")

    assert not rows.attempt("sampler (bf16, compiled, batch 4096)", fails)
    assert rows.attempt("filter (cuda)", lambda: [{"stage": "filter (cuda)", "queries_per_s": 1.0}])
    assert rows == [
        {"stage": "sampler (bf16, compiled, batch 4096)", "error": "RuntimeError: CUDA out of memory"},
        {"stage": "filter (cuda)", "queries_per_s": 1.0},
    ]
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
