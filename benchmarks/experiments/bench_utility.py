"""Utility under DP: train → calibrate → audit for a list of recipes, one table row per recipe.

    .venv/bin/python benchmarks/experiments/bench_utility.py --store demo/store --out bench_runs/utility \\
        --recipe baseline --recipe conditioning --epsilon 8

Every recipe starts from the same store, public seed and public prior (cached under ``--out/priors``, public
data only) and changes one lever of the preset (``RECIPES``). ``--quick`` replaces the full audit by its
utility and fidelity stages (fewer samples, no filter, no attacks) to rank recipes; run the winner without it.
``--no-dp`` trains the same recipe with the same steps but without clipping or noise: the ceiling no DP lever
can lift it above. ``--grid`` draws the map of cohort size × ε × compute for the recipes given::

    .venv/bin/python benchmarks/experiments/bench_utility.py --grid --grid-store demo/store \\
        --grid-store demo10k/store \\
        --grid-epsilon 1,4,8,inf --grid-compute 1,4 --recipe batch128-logit-normal --quick --n 300 \\
        --out bench_runs/map --figure bench_runs/map/map.png

(compute c: the epochs that show c × cpu-small's 80 000 patient-slices, so a larger cohort gets fewer epochs;
ε = inf trains without DP) and prints the table; the quick audit's TSTR is the fair protocol's (a synthetic
training set as large as the real one) unless ``--small-tstr-only``. Rows are appended to
``--out/results.jsonl`` and printed (JSON, one per line); ``bench_map.py`` draws the map from the rows of every
invocation so far. Runs on a demo store spend its privacy budget many times
over (``allow_over_budget``): this is a benchmark, not a release.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from app.audit import (
    FEATURE_EMBEDDING,
    AuditSettings,
    Synthetic,
    fidelity_section,
    load_real,
    run_audit,
    utility_section,
)
from app.calibrate import calibrate
from generators.registry import load_generator
from privacy_filters.embeddings import make_embedding
from train.dp_training import TrainConfig, read_training_record, train_model
from train.presets import PRESETS, Preset, get_preset
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine

# One lever per row against the baseline: the cpu-small preset as it shipped before this benchmark, so the
# fields whose cpu-small default changed since are pinned (PINNED, cpu-small recipes only) and a recipe names
# only what it changes.
PINNED = {"cpu-small": {"label_init": "random", "timestep_sampling": "uniform"}}
CPU_SMALL_PATIENT_SLICES = 80_000  # cpu-small's compute: 100 epochs of ≈ 800 training patients, one slice each
RECIPES_FILE = Path(__file__).with_name("recipes.toml")


def load_recipes(path: Path = RECIPES_FILE) -> dict[str, dict]:
    """The recipe table (``recipes.toml``), each recipe checked now: a known preset, only ``Preset`` fields, and
    values the preset accepts (``Preset.__post_init__``), so a renamed field fails here, not mid-benchmark."""
    recipes = tomllib.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Preset)}
    for name, spec in recipes.items():
        unknown = sorted(set(spec) - fields - {"preset"})
        if spec.get("preset") not in PRESETS or unknown:
            raise ValueError(f"recipe {name!r} in {path.name}: preset {spec.get('preset')!r}, unknown fields {unknown}")
        get_preset(spec["preset"], **{k: v for k, v in spec.items() if k != "preset"})
    return recipes


RECIPES = load_recipes()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", action="append", required=True, help=f"one of {sorted(RECIPES)} (repeat)")
    parser.add_argument("--set", action="append", default=[], help="extra preset override KEY=JSON for every recipe")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument(
        "--no-dp", action="store_true", help="train WITHOUT DP (same steps, no clipping or noise): the recipe's ceiling"
    )
    parser.add_argument("--quick", action="store_true", help="utility and fidelity only (ranking runs)")
    parser.add_argument(
        "--small-tstr-only",
        action="store_true",
        help="TSTR on the n samples per label only (the earlier protocol), not also on a set as large as the real one",
    )
    parser.add_argument("--n", type=int, default=500, help="samples per label in the audit")
    parser.add_argument("--guidance", type=float, default=None, help="sampler guidance for --quick (default: card)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse a trained model in --out/<recipe>/model")
    parser.add_argument(
        "--sample-seed", type=int, default=10_000, help="public seed of --quick's samples (re-score a --reuse model)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="train each recipe N times (fresh DP noise and sampling each run)"
    )
    parser.add_argument(
        "--grid", action="store_true", help="the map: every recipe × --grid-store × --grid-epsilon × --grid-compute"
    )
    parser.add_argument("--grid-store", type=Path, action="append", default=[], help="a store of the map (repeat)")
    parser.add_argument(
        "--grid-epsilon", type=_epsilons, default=[1.0, 4.0, 8.0, math.inf], help="comma-separated, inf: no DP"
    )
    parser.add_argument(
        "--grid-compute",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[1.0, 4.0],
        help="multiples of cpu-small's compute (patient-slices seen), comma-separated",
    )
    parser.add_argument("--figure", type=Path, default=None, help="--grid: write the map as a PNG here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _epsilons(text: str) -> list[float]:
    return [math.inf if x.strip() in ("inf", "∞") else float(x) for x in text.split(",")]


def preset_for(recipe: str, extra: list[str]):
    name = RECIPES[recipe]["preset"]
    spec = {**PINNED.get(name, {}), **RECIPES[recipe]}
    del spec["preset"]
    for item in extra:
        key, value = item.split("=", 1)
        spec[key] = json.loads(value)
    return get_preset(name, **spec)


def quick_audit(
    store: Path,
    model_dir: Path,
    n: int,
    guidance: float | None,
    sample_seed: int,
    matched: bool = True,
    device: str = "cpu",
) -> dict:
    """TSTR/TRTR and Fréchet ratios on ``n`` unfiltered samples per label (a ranking proxy for the audit); with
    ``matched``, TSTR also trains on as many unfiltered samples as the real training set has (same label shares),
    the audit's fair protocol, from seeds of their own."""
    model = load_generator(model_dir, device=device)
    real = load_real(CohortStore.open(store), model)
    names = list(model.label_ids)
    settings = AuditSettings(n=n, classifier_seeds=2)
    kwargs = {"guidance": guidance} if guidance is not None else {}

    def draw(per_label: dict[str, int], seed: int) -> Synthetic:
        labels = [name for name in names for _ in range(per_label[name])]
        generated = model.generate(labels=labels, seed=seed, **kwargs)
        return Synthetic(generated.images.numpy(), np.array([model.label_ids[x] for x in labels]))

    synthetic = draw(dict.fromkeys(names, n), sample_seed)
    larger = None
    if matched:
        counts = {name: int((real.train_labels == model.label_ids[name]).sum()) for name in names}
        larger = draw(counts, sample_seed + 1_000_000)  # seeds no sample of the small set uses
    size, dims = model.image_shape[-1], model.spatial_dims
    return score_samples(real, synthetic, names, settings, size, dims, larger, torch.device(device))


def score_samples(
    real,
    synthetic: Synthetic,
    names: list[str],
    settings: AuditSettings,
    size: int,
    dims: int,
    matched: Synthetic | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """The quick audit of ``synthetic`` against the store's real images: TSTR/TRTR (also on ``matched``, a
    synthetic set as large as the real one), Fréchet ratios, MS-SSIM."""
    utility, trtr_model = utility_section(real, synthetic, len(names), settings, device, matched=matched)
    embedding = make_embedding(FEATURE_EMBEDDING, size, dims)
    fid = fidelity_section(real, synthetic, names, trtr_model, embedding, settings)
    return {"utility": utility, "fidelity": fid, "quick": True}


def score_columns(report: dict) -> dict:
    """A report's utility and fidelity numbers as one results row's columns."""
    utility, fid = report["utility"], report["fidelity"]
    if "tstr_small_n" in utility:  # both protocols on the same samples: "tstr"/"ratio" are the fair one's
        small = {
            "tstr_small_n": utility["tstr_small_n"]["accuracy"],
            "ratio_small_n": utility["ratio_small_n"]["accuracy"],
        }
        protocol = "fair"
    else:
        small, protocol = {}, "n per label"
    return {
        **small,
        "tstr_protocol": protocol,
        "tstr": utility["tstr"]["accuracy"],
        "tstr_per_seed": [round(r["accuracy"], 3) for r in utility["tstr"]["per_seed"]],
        "tstr_auc": utility["tstr"]["auc"],
        "trtr": utility["trtr"]["accuracy"],
        "ratio": utility["ratio"]["accuracy"],
        "fd_filter": fid["frechet"]["filter_embedding"]["ratio"],
        "fd_classifier": fid["frechet"]["classifier_features"]["ratio"],
        "ms_ssim": {k: round(v, 3) for k, v in fid["ms_ssim"]["synthetic"].items()},
    }


def row(recipe: str, card: dict, record: dict, report: dict, audit_s: float, guidance: float) -> dict:
    out = {
        "recipe": recipe,
        "epsilon": card["epsilon"],
        "trainable": card["trainable_parameters"]["trained"],
        "m": card["slices_per_patient"],
        "K": card["noise_multiplicity"],
        "steps": card["steps"],
        "batch": card["preset"]["batch_size"],
        "lr": card["preset"]["learning_rate"],
        "guidance": guidance,
        **score_columns(report),
        "train_s": record.get("training_wall_time_s"),
        "prior_s": record.get("public_pretraining_wall_time_s"),
        "dp_step_s": record["training_wall_time_s"] / max(1, card["steps"]),
        "audit_s": round(audit_s, 1),
        "quick": bool(report.get("quick")),
    }
    if not report.get("quick"):
        privacy = report["privacy"]
        out["mia_loss_auc"] = privacy["membership_inference"]["loss"]["auc"]
        out["mia_mc_auc"] = privacy["membership_inference"]["monte_carlo"]["filtered"]["auc"]
        out["filter_catch"] = privacy["filter"]["catch_rate_unfiltered"]
    return out


@dataclass(frozen=True)
class Cell:
    """One run: a recipe trained on a store at an ε (``None``: without DP) and a compute multiple of cpu-small's."""

    recipe: str
    store: Path
    epsilon: float | None
    compute: float | None  # None: the recipe's own epochs
    run: int

    def name(self, grid: bool, repeats: int) -> str:
        parts = [self.recipe]
        if grid:
            eps = "nodp" if self.epsilon is None else f"eps{self.epsilon:g}"
            parts += [self.store.name, eps, f"{self.compute:g}x"]
        return "/".join(parts) + (f"/run{self.run}" if repeats > 1 else "")


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """Every (recipe, run) — or, with ``--grid``, every recipe × store × ε × compute — run-major, so that partial
    invocations still pair up."""
    if not args.grid:
        epsilon = None if args.no_dp else args.epsilon
        return [Cell(r, args.store, epsilon, None, run) for run in range(args.repeats) for r in args.recipe]
    stores = args.grid_store or [args.store]
    return [
        Cell(recipe, store, None if eps == math.inf else eps, compute, run)
        for run in range(args.repeats)
        for recipe in args.recipe
        for store in stores
        for compute in args.grid_compute
        for eps in args.grid_epsilon
    ]


def epochs_for(compute: float, store: Path) -> float:
    """Epochs that give ``compute`` × cpu-small's patient-slices seen (100 epochs of ≈ 800 training patients) on a
    store of N̂ training patients: a larger cohort gets fewer epochs of the same compute."""
    return compute * CPU_SMALL_PATIENT_SLICES / CohortStore.open(store).patients_estimate


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for cell in plan_cells(args):
        recipe, run = cell.recipe, cell.run
        preset = replace(preset_for(recipe, args.set), name=recipe)
        if cell.compute is not None:
            preset = replace(preset, epochs=epochs_for(cell.compute, cell.store))
        model_dir = args.out / cell.name(args.grid, args.repeats) / "model"
        config = TrainConfig(
            store=cell.store,
            out=model_dir,
            preset=preset,
            epsilon=cell.epsilon,
            dp=cell.epsilon is not None,
            prior_cache=args.out / "priors",
            allow_over_budget=True,
            force=not args.reuse,
            samples_per_label=16,
        )
        card = train_model(config).card.to_json()
        record = read_training_record(model_dir)
        started = time.perf_counter()
        if args.quick:
            report = quick_audit(
                cell.store, model_dir, args.n, args.guidance, args.sample_seed, matched=not args.small_tstr_only
            )
        else:
            calibrate(cell.store, model_dir)
            report = run_audit(
                cell.store, model_dir, model_dir.parent / "audit", AuditSettings(n=args.n), force=True
            ).as_json()
        guidance = args.guidance if args.quick and args.guidance is not None else card["sampler"]["guidance"]
        result = row(recipe, card, record, report, time.perf_counter() - started, guidance)
        result["run"] = run
        if args.grid:
            result["cell"] = {
                "patients_estimate": (card.get("patients_estimate") or {}).get("value")  # None without DP
                or CohortStore.open(cell.store).patients_estimate,
                "epsilon": "inf" if cell.epsilon is None else cell.epsilon,
                "compute": cell.compute,
            }
        if args.quick:
            result["sample_seed"] = args.sample_seed
        result.update(machine=machine(), date=date.today().isoformat())
        with (args.out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.repeats > 1:
        print_spread(results, args.recipe)
    if args.grid:
        print(grid_table(results))
        if args.figure:
            grid_figure(results, args.figure)


def _line(row: dict) -> tuple[str, int, float]:
    """The map's line a grid row belongs to: its recipe, N̂ and compute."""
    return row.get("recipe", "?"), row["cell"]["patients_estimate"], row["cell"]["compute"]


PROTOCOL_NAMES = {"fair": "synthetic set as large as the real one", "small": "n synthetic slices per label"}


def protocol_ratio(row: dict, protocol: str) -> float | None:
    """A row's TSTR/TRTR under ``protocol`` ("fair": a synthetic training set as large as the real one; "small":
    the n per label of ``--n``), or None where the row did not score it (older rows without ``tstr_protocol`` are
    fair-protocol rows)."""
    fair = row.get("tstr_protocol", "fair") == "fair"
    if protocol == "fair":
        return row["ratio"] if fair else None
    return row.get("ratio_small_n") if fair else row["ratio"]


def _epsilon_order(rows: list[dict]) -> list:
    return sorted({r["cell"]["epsilon"] for r in rows}, key=lambda e: math.inf if e == "inf" else e)


def grid_table(rows: list[dict], protocol: str = "fair") -> str:
    """The map as a Markdown table: one row per (recipe, N̂, compute), one column per ε; each cell TSTR/TRTR under
    ``protocol`` (Fréchet ratio in the filter embedding), several runs of a cell side by side."""
    rows = [r for r in rows if protocol_ratio(r, protocol) is not None]
    epsilons = _epsilon_order(rows)
    lines = [
        "| recipe | training patients (DP count) | compute × cpu-small | "
        + " | ".join(f"ε = {e}" for e in epsilons)
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in epsilons) + " |",
    ]
    for line in sorted(set(map(_line, rows))):
        cells = []
        for eps in epsilons:
            mine = [r for r in rows if _line(r) == line and r["cell"]["epsilon"] == eps]
            scores = [f"{protocol_ratio(r, protocol):.3f} ({r['fd_filter']:.1f})" for r in mine]
            cells.append(" / ".join(scores) if scores else "not run")
        recipe, n, compute = line
        lines.append(f"| {recipe} | {n} | {compute:g}× | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_figure(rows: list[dict], path: Path, protocol: str = "fair") -> None:
    """TSTR/TRTR under ``protocol`` against ε, one line per (recipe, N̂, compute), written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if protocol_ratio(r, protocol) is not None]
    order = _epsilon_order(rows)
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for line in sorted(set(map(_line, rows))):
        points = sorted(
            (order.index(r["cell"]["epsilon"]), protocol_ratio(r, protocol)) for r in rows if _line(r) == line
        )
        recipe, n, compute = line
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=f"N ≈ {n}, {compute:g}× compute, {recipe}",
        )
    axes.set_xticks(range(len(order)), [f"ε = {e}" for e in order])
    axes.set_ylabel(f"TSTR / TRTR accuracy ({PROTOCOL_NAMES[protocol]})")
    axes.set_ylim(0.45, 1.0)
    axes.axhline(0.5, color="grey", lw=0.5)
    axes.legend(fontsize=7)
    axes.set_title("Utility by cohort size, privacy and compute (demo cohort)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_spread(rows: list[dict], recipes: list[str]) -> None:
    """Mean ± sample sd of TSTR/TRTR and the Fréchet ratios per recipe over this invocation's ``rows``."""
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        summary = {
            key: f"{np.mean([r[key] for r in mine]):.3f} ± {np.std([r[key] for r in mine], ddof=1):.3f}"
            for key in ("tstr", "trtr", "ratio", "fd_filter", "fd_classifier")
        }
        print(f"{recipe} ({len(mine)} runs): {json.dumps(summary, ensure_ascii=False)}", flush=True)


if __name__ == "__main__":
    main()
