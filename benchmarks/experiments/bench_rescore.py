"""Re-score already trained models without training: the audit's TSTR protocol (n samples per label against a
synthetic training set as large as the real one) and the sampler's guidance scale.

    .venv/bin/python benchmarks/experiments/bench_rescore.py --store demo/store --model demo/model [--model M2 ...] \\
        [--guidance 1,2,4,6] [--small-tstr-only] --n 300 --threads 1

Each (model, guidance) is scored by ``bench_utility.quick_audit``: unfiltered samples, two classifier seeds, the
audit's fixed classifier budget, TSTR/TRTR on real held-out patients, Fréchet ratios and MS-SSIM. Without
``--small-tstr-only`` TSTR trains on the larger set too (``tstr``), and ``tstr_small_n`` is the n per label.
Rows print as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
from bench_utility import quick_audit, score_columns  # scripts run from benchmarks/, which Python puts on the path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", type=Path, action="append", required=True, help="a trained bundle (repeat)")
    parser.add_argument("--n", type=int, default=300, help="samples per label of the small set")
    parser.add_argument(
        "--guidance", type=lambda text: [float(x) for x in text.split(",")], default=[None], help="comma-separated"
    )
    parser.add_argument("--small-tstr-only", action="store_true", help="TSTR on the n per label only")
    parser.add_argument("--sample-seed", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for model_dir in args.model:
        for guidance in args.guidance:
            started = time.perf_counter()
            matched = not args.small_tstr_only
            report = quick_audit(args.store, model_dir, args.n, guidance, args.sample_seed, matched=matched)
            row = {
                "model": str(model_dir),
                "guidance": guidance,
                **score_columns(report),
                "protocol": report["utility"]["protocol"],
                "seconds": round(time.perf_counter() - started),
                "machine": machine(),
                "date": date.today().isoformat(),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
