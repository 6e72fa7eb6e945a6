"""Audit numbers side by side (e.g. the ε = 8 demo model and a non-private one) as a BENCHMARKS.md table.

    .venv/bin/python benchmarks/privacy/bench_audit.py --store demo/store --model demo/model --model demo/model-nodp

Runs ``synthcohort audit`` with its defaults (500 samples per label) for every ``--model`` into
``--out/<model dir name>`` (or reads an existing ``report.json`` there with ``--reuse``) and prints one
Markdown column per model plus the wall time of each audit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.audit import AuditSettings, run_audit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine_header

ROWS = (
    ("privacy guarantee", lambda r: _guarantee(r)),
    (
        "TSTR accuracy (± sd)",
        lambda r: f"{r['utility']['tstr']['accuracy']:.3f} ± {r['utility']['tstr']['accuracy_sd']:.3f}",
    ),
    (
        "TRTR accuracy (± sd)",
        lambda r: f"{r['utility']['trtr']['accuracy']:.3f} ± {r['utility']['trtr']['accuracy_sd']:.3f}",
    ),
    ("TSTR / TRTR accuracy", lambda r: f"{r['utility']['ratio']['accuracy']:.3f}"),
    ("TSTR / TRTR AUC", lambda r: f"{r['utility']['tstr']['auc']:.3f} / {r['utility']['trtr']['auc']:.3f}"),
    ("FD ratio, classifier features (synthetic ÷ train, vs holdout)", lambda r: _fd(r, "classifier_features")),
    ("FD ratio, filter embedding", lambda r: _fd(r, "filter_embedding")),
    ("MS-SSIM within synthetic / within real", lambda r: _ms_ssim(r)),
    ("DCR share, released (filter on) / filter off", lambda r: _dcr(r)),
    ("filter catch rate on unfiltered samples", lambda r: f"{r['privacy']['filter']['catch_rate_unfiltered']:.1%}"),
    ("loss MIA per patient: AUC / TPR@1%FPR", lambda r: _mia(r["privacy"]["membership_inference"]["loss"])),
    (
        "Monte-Carlo MIA, released: AUC / TPR@1%FPR",
        lambda r: _mia(r["privacy"]["membership_inference"]["monte_carlo"]["filtered"]),
    ),
    (
        "Monte-Carlo MIA, filter off: AUC / TPR@1%FPR",
        lambda r: _mia(r["privacy"]["membership_inference"]["monte_carlo"]["unfiltered"]),
    ),
    ("(ε, δ) ceiling for any attack: AUC / TPR@1%FPR", lambda r: _bound(r)),
    ("audit wall time", lambda r: f"{r['timings_s']['total']:.0f} s"),
)


def _guarantee(r: dict) -> str:
    m = r["model"]
    return f"ε = {m['epsilon']:.3g}, δ = {m['delta']:g}" if m["dp"] else "none (NOT PRIVATE)"


def _fd(r: dict, space: str) -> str:
    f = r["fidelity"]["frechet"][space]
    return f"{f['ratio']:.2f} ({f['synthetic_vs_holdout']:.3g} vs {f['train_vs_holdout']:.3g})"


def _ms_ssim(r: dict) -> str:
    m = r["fidelity"]["ms_ssim"]
    syn = sum(m["synthetic"].values()) / len(m["synthetic"])
    real = sum(m["real"].values()) / len(m["real"])
    return f"{syn:.3f} / {real:.3f}"


def _dcr(r: dict) -> str:
    d = r["privacy"]["dcr"]
    return f"{d['share_filtered']:.3f} / {d['share_unfiltered']:.3f}"


def _mia(m: dict) -> str:
    return f"{m['auc']:.3f} / {m['tpr_at_low_fpr']:.3f} ({m['n_members']} vs {m['n_nonmembers']} patients)"


def _bound(r: dict) -> str:
    b = r["privacy"]["dp_bound"]
    return f"{b['auc']:.4f} / {b['tpr_at_low_fpr']:.3f}" if b["private"] else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--model", action="append", required=True, help="model bundle (repeatable)")
    parser.add_argument("--out", default="demo/audits", help="reports go to OUT/<model dir name>")
    parser.add_argument("--n", type=int, default=500, help="samples per label")
    parser.add_argument("--reuse", action="store_true", help="read existing reports instead of re-running")
    args = parser.parse_args()
    reports = []
    for model in args.model:
        out = Path(args.out) / Path(model).name
        if args.reuse and (out / "report.json").is_file():
            reports.append(json.loads((out / "report.json").read_text()))
            continue
        start = time.perf_counter()
        reports.append(run_audit(args.store, model, out, AuditSettings(n=args.n), force=True).as_json())
        print(f"{model}: audited in {time.perf_counter() - start:.0f} s")
    print(f"{machine_header()}; {args.n} samples per label")
    print("| measure | " + " | ".join(Path(m).name for m in args.model) + " |")
    print("| --- |" + " --- |" * len(args.model))
    for name, cell in ROWS:
        print(f"| {name} | " + " | ".join(cell(r) for r in reports) + " |")


if __name__ == "__main__":
    main()
