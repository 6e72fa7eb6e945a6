"""Seconds the privacy accounting costs a training run: planning σ, and ε along the way.

    .venv/bin/python benchmarks/perf/bench_accounting.py

For each setting (the demo's cpu-small plan, the tests' 12-patient store, a 8 000-patient store) it times
``plan_privacy`` (σ solved to ε within EPSILON_TOLERANCE of the target, the DP patient count composed in) and the
ε a run reports every 10 steps plus at its end, counting the ε evaluations, each from cold caches. Numbers are
PRV's (the default accountant); ``--accountant rdp`` for RDP's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from opacus.accountants.analysis import rdp as opacus_rdp

import train.accounting as accounting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

SETTINGS = {  # name: (patients estimate N̂, expected batch B, epochs)
    "demo cpu-small (N̂ 800, B 512, 100 epochs)": (800, 512, 100.0),
    "tests' store (N̂ 12, B 4, 40 epochs)": (12, 4, 40.0),
    "large store (N̂ 8000, B 512, 10 epochs)": (8000, 512, 10.0),
}


def _clear_caches() -> None:
    for cached in (getattr(accounting, "_epsilon", None), opacus_rdp._compute_rdp):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _counted(calls: list[int]):
    original = accounting.epsilon_of

    def epsilon_of(*args, **kwargs) -> float:
        calls[0] += 1
        return original(*args, **kwargs)

    return original, epsilon_of


def measure(patients: int, batch: int, epochs: float, accountant: str) -> dict[str, float]:
    """Seconds and ε evaluations of one plan, then of the run's progress reports (every 10 steps and the end)."""
    calls = [0]
    original, counting = _counted(calls)
    accounting.epsilon_of = counting  # solve_noise_multiplier looks it up in the module on every call
    try:
        _clear_caches()
        start = time.perf_counter()
        plan = accounting.plan_privacy(
            target_epsilon=8.0,
            delta=1e-5,
            patients_estimate=patients,
            batch_size=batch,
            epochs=epochs,
            accountant=accountant,
            prior=[accounting.count_mechanism()],
        )
        plan_seconds, plan_calls = time.perf_counter() - start, calls[0]
    finally:
        accounting.epsilon_of = original
    _clear_caches()
    start = time.perf_counter()
    reports = [*range(10, plan.steps, 10), plan.steps]
    for step in reports:
        spent = accounting.epsilon_of(plan.history(step), delta=1e-5, accountant=accountant)
    return {
        "sigma": plan.noise_multiplier,
        "steps": plan.steps,
        "epsilon": spent,
        "plan_s": plan_seconds,
        "plan_evaluations": plan_calls,
        "progress_s": time.perf_counter() - start,
        "progress_reports": len(reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accountant", default="prv", choices=accounting.ACCOUNTANTS)
    args = parser.parse_args()
    print(machine_header())
    print("| setting | σ | steps | ε spent | plan (s) | ε evaluations | progress ε (s) | reports |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (patients, batch, epochs) in SETTINGS.items():
        r = measure(patients, batch, epochs, args.accountant)
        print(
            f"| {name} | {r['sigma']:.4f} | {r['steps']} | {r['epsilon']:.3f} | {r['plan_s']:.1f} | "
            f"{r['plan_evaluations']} | {r['progress_s']:.1f} | {r['progress_reports']} |"
        )


if __name__ == "__main__":
    main()
