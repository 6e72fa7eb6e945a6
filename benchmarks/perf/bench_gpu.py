"""The GPU benchmark: one command on a bare GPU machine with only the project's wheels; downloads nothing.

    .venv/bin/python benchmarks/perf/bench_gpu.py --device cuda --out bench_runs/gpu

(install torch with CUDA first, or on an offline machine that has it, the wheels of ``make wheelhouse``: see the
README's GPU section). It prints one JSON line per measurement as it is taken (a measurement that fails is an
error row; the rest still run) and, at the end, a Markdown table for BENCHMARKS.md. What compiles runs last in
each part, so a run cut short loses the least:

- the DP step the trainer ships (torch.func per-patient gradients in the preset's precision, then Opacus'
  clipping, noise and Adam), for the networks of cpu-small and gpu (2-D) and of cpu-3d and gpu-3d (3-D), cpu-small
  also in one pass of 512 patients (``--physical-batch-size 512``), and that and gpu with ``--compile``
  (torch.compile, CUDA graphs on a GPU; its first call, the compilation, is reported apart), timed on one
  physical batch and reported per 512 expected patients;
- the public-prior step (non-private, cpu-small's network, a batch of 64 slices);
- end to end on a freshly built demo store (1 000 patients): demo-data, ingest, training cpu-small at ε = 8,
  calibrate, an export of 100 slices per label (train + calibrate + export: ``make demo``'s work) and a quick audit
  (TSTR/TRTR on the n per label), each timed;
- on the model just trained: the sampler (slices/s at 32 px, DPM-Solver++ 20 steps, guidance 2; the network in
  fp32, under bf16 autocast, and compiled — ``generate(compile=True)``: inductor with CUDA graphs — each with
  its RMSE against the fp32 samples of the same seeds; at a batch of 4 096 and at the export's batch of 64) and the
  memorization filter (queries/s, the default two views; embedding and re-ranking on the device, then on the
  CPU for comparison; the FAISS search stays on the CPU).

``--device cpu --quick`` runs every stage at toy sizes: a smoke test of this script on a CPU (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from functools import partial
from pathlib import Path

import torch
from bench_dp_step import shipped_dp_step  # scripts run from benchmarks/, which Python puts on the path

from app.calibrate import calibrate
from app.pipeline import CohortRequest, build_cohort
from generators.diffusion import denoising_loss, noise_schedule, training_scheduler
from generators.layout import BundleLayout
from generators.registry import load_generator
from generators.unet import UNet3DSize, UNetSize
from privacy_filters import MemorizationFilter
from train.demo_cohort import make_demo_cohort
from train.dp_training import TrainConfig, build_network, read_training_record, train_model
from train.ingest import IngestOptions, ingest
from train.presets import Preset, get_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # bench_utility's quick audit
from bench_utility import quick_audit, score_columns
from common import cpu_model, cpu_seconds, cpu_split

EXPECTED_PATIENTS = 512  # the DP step's logical batch, as in the table
ONE_PASS = get_preset("cpu-small", physical_batch_size=EXPECTED_PATIENTS)  # the whole step in one pass
TOY_2D = UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4)
TOY_3D = UNet3DSize(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=4)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds of ``fn`` after one warm-up call, synchronising the device."""

    def once() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    return min(once() for _ in range(repeats))


def dp_stage(preset: Preset) -> str:
    """``dp_step_<preset>[_pass<P>][_compiled]``: P where the physical batch is not the preset's own."""
    own = get_preset(preset.name).physical_batch_size
    return (
        f"dp_step_{preset.name}"
        + (f"_pass{preset.physical_batch_size}" if preset.physical_batch_size != own else "")
        + ("_compiled" if preset.compile else "")
    )


def dp_step_seconds(preset: Preset, device: torch.device, quick: bool) -> dict:
    """One physical batch of the shipped DP step, scaled to ``EXPECTED_PATIENTS`` patients."""
    torch.manual_seed(0)
    if quick:
        preset = replace(preset, image_size=16, unet=TOY_3D if preset.spatial_dims == 3 else TOY_2D)
    model = build_network(preset, n_classes=2).to(device)
    params = {name: p for name, p in model.named_parameters()}
    b = min(preset.patients_per_pass, EXPECTED_PATIENTS, 4 if quick else EXPECTED_PATIENTS)
    k = preset.slices_per_patient * preset.noise_multiplicity
    item = (1, *(preset.image_size,) * preset.spatial_dims)
    alphas = noise_schedule(training_scheduler(preset.prediction)).to(device)  # type: ignore[arg-type]
    batch = (
        torch.rand(b, k, *item, device=device) * 2 - 1,
        torch.randint(0, 3, (b, k), device=device),
        torch.randint(0, 1000, (b, k), device=device),
        torch.randn(b, k, *item, device=device),
    )
    backend = ("aot_eager" if quick else "inductor") if preset.compile else None  # quick: no code generation
    step, _ = shipped_dp_step(
        model,
        alphas,
        preset.prediction,
        params,
        EXPECTED_PATIENTS,
        *batch,
        precision=preset.precision,
        compile_backend=backend,
    )
    started = time.perf_counter()
    step()  # the first call compiles (--compile)
    first_s = time.perf_counter() - started
    seconds = timed(step, device)
    return {
        "stage": dp_stage(preset),
        "precision": preset.precision,
        "first_call_s": round(first_s, 1),
        "patients_per_pass": b,
        "draws_per_patient": k,
        "item": list(item),
        "pass_s": round(seconds, 4),
        "per_512_patients_s": round(seconds * EXPECTED_PATIENTS / b, 4),
    }


def public_prior_step_seconds(device: torch.device, quick: bool) -> dict:
    preset = get_preset("cpu-small", **({"image_size": 16, "unet": TOY_2D} if quick else {}))
    torch.manual_seed(0)
    model = build_network(preset, n_classes=2).to(device)
    alphas = noise_schedule(training_scheduler(preset.prediction)).to(device)  # type: ignore[arg-type]
    adam = torch.optim.Adam(model.parameters(), lr=preset.public_learning_rate)
    n, size = preset.public_batch_size, preset.image_size
    images = torch.rand(n, 1, size, size, device=device) * 2 - 1
    labels = torch.full((n,), 2, device=device)  # the null class: the prior is unconditional
    timesteps = torch.randint(0, 1000, (n,), device=device)
    noise = torch.randn(n, 1, size, size, device=device)

    def step() -> None:
        adam.zero_grad()
        denoising_loss(model, images, labels, timesteps, noise, alphas, preset.prediction).backward()  # type: ignore[arg-type]
        adam.step()

    return {"stage": "public_prior_step", "batch": n, "step_s": round(timed(step, device), 4)}


class Rows(list):
    """The benchmark's rows, each printed as a JSON line when recorded (a run cut short keeps what it printed)."""

    def record(self, row: dict) -> dict:
        self.append(row)
        print(json.dumps(row), flush=True)
        return row

    def attempt(self, name: str, measure: Callable[[], dict | list[dict] | None]) -> bool:
        """Record ``measure()``'s row(s) (``None``: it recorded its own), or one error row when it fails: a GPU
        session is short, so one failing measurement (a compiler, memory) must not cost the others. Returns whether
        it succeeded."""
        try:
            result = measure()
        except Exception as exc:  # reported as a row; the benchmark goes on
            traceback.print_exc()
            self.record({"stage": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            return False
        for row in [] if result is None else result if isinstance(result, list) else [result]:
            self.record(row)
        return True


def end_to_end(root: Path, device: torch.device, quick: bool, workers: int, rows: Rows) -> Path | None:
    """demo-data → ingest → train cpu-small at ε = 8 → calibrate → export → quick audit; one row per stage.
    Returns the model, or ``None`` when a stage the others build on failed (its error row recorded)."""

    def stage(name: str, fn: Callable[[], object], details: Callable[[object], dict] = lambda _: {}) -> dict:
        started, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        main_s, workers_s = cpu_split(cpu)  # the main process's share bounds what more workers can give
        return {
            "stage": name,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_main_s": round(main_s, 1),
            "cpu_workers_s": round(workers_s, 1),
            **details(result),
        }

    def training_split(_: object) -> dict:  # the DP steps and the public prior, from the run's private record
        record = read_training_record(root / "model")
        return {
            "dp_s": round(record["training_wall_time_s"], 1),
            "prior_s": round(record["public_pretraining_wall_time_s"], 1),
        }

    patients = 140 if quick else 1000
    options = IngestOptions(labels=("healthy", "lesion"), workers=workers, holdout=0.4 if quick else 0.2)
    overrides = {"image_size": 16, "unet": TOY_2D, "batch_size": 16, "epochs": 1, "public_pretrain_steps": 10}
    preset = get_preset("cpu-small", **(overrides if quick else {}))
    config = TrainConfig(store=root / "store", out=root / "model", preset=preset, epsilon=8.0, device=str(device))
    audit_n, export_n = (20, 10) if quick else (300, 100)
    stages: list[tuple] = [  # (name, what it runs[, the details its row adds])
        ("demo_data", lambda: make_demo_cohort(root / "raw", patients=patients, seed=0, workers=workers)),
        (
            "ingest",
            lambda: ingest(root / "raw", root / "store", labels_path=root / "raw" / "labels.csv", options=options),
        ),
        ("train_cpu_small_eps8", lambda: train_model(config), training_split),
        ("calibrate", lambda: calibrate(root / "store", root / "model", device=device.type)),
        (  # make demo's release step, at the size: 100 slices per label, generated, filtered, written
            "export_100_per_label",
            lambda: build_cohort(
                root / "model",
                CohortRequest(counts={"healthy": export_n, "lesion": export_n}, seed=0),
                root / "cohort",
                device=str(device),
            ),
        ),
        (
            "quick_audit",
            lambda: quick_audit(
                root / "store", root / "model", audit_n, None, 10_000, matched=False, device=str(device)
            ),
            score_columns,
        ),
    ]
    for name, *run in stages:
        if not rows.attempt(name, partial(stage, name, *run)) and name not in ("export_100_per_label", "quick_audit"):
            return None  # the later stages need this one's output
    demo_work = [
        r["seconds"] for r in rows if r["stage"] in ("train_cpu_small_eps8", "calibrate", "export_100_per_label")
    ]
    if len(demo_work) == 3:  # the target: make demo's work in ≤ 2 minutes on one GPU
        rows.record({"stage": "make_demo_work (train + calibrate + export)", "seconds": round(sum(demo_work), 1)})
    return root / "model"


PARTS = ("dp-step", "end-to-end", "sampler", "dp-step-compiled")  # in the order they run
SAMPLER_RUNS = (  # (precision, compiled, batch): a GPU-sized batch, then the export's shard size (its batch)
    ("fp32", False, None),
    ("bf16", False, None),
    ("bf16", True, None),
    ("fp32", False, 64),
    ("fp32", True, 64),
)


def sampler_and_filter(model_dir: Path, device: torch.device, quick: bool, rows: Rows) -> None:
    """The sampler's and the filter's rows, each attempted (and recorded) on its own."""
    model = load_generator(model_dir, device=str(device))
    n = 64 if quick else 4096
    labels = {name: n // 2 for name in model.label_ids}
    generated = model.generate(labels=labels, seed=0, batch_size=n)  # warm-up and the filter's queries
    images = generated.images.numpy()
    eager = [run for run in SAMPLER_RUNS if not run[1]]
    compiled = [run for run in SAMPLER_RUNS if run[1]]  # last: compilation takes the most time
    for run in eager:
        rows.attempt(sampler_stage(run, n), partial(sampler_row, model, labels, generated.images, device, run, quick))
    for where in dict.fromkeys((device.type, "cpu")):  # embedding and re-ranking on the device, then on the CPU
        rows.attempt(f"filter ({where})", partial(filter_row, model_dir, images, where))
    for run in compiled:
        rows.attempt(sampler_stage(run, n), partial(sampler_row, model, labels, generated.images, device, run, quick))


def filter_row(model_dir: Path, images, where: str) -> dict:
    filt = MemorizationFilter.load(BundleLayout(model_dir).filter_dir, device=where)
    filt.check(images[:64])  # warm-up
    started = time.perf_counter()
    filt.check(images)
    filter_s = time.perf_counter() - started
    return {"stage": f"filter ({where})", "queries": len(images), "queries_per_s": round(len(images) / filter_s, 1)}


def sampler_stage(run: tuple, total: int) -> str:
    precision, compiled, batch = run
    return f"sampler ({precision}{', compiled' if compiled else ''}, batch {batch or total})"


def sampler_row(
    model, labels: dict[str, int], reference: torch.Tensor, device: torch.device, run: tuple, quick: bool
) -> dict:
    """Slices/s of one sampler configuration, after a warm-up call (which compiles: its time is reported), with
    the RMSE of its samples against the eager fp32 ones of the same seeds."""
    precision, compiled, batch = run
    total = sum(labels.values())
    compile = ("aot_eager" if quick and device.type == "cpu" else True) if compiled else False  # quick: no codegen
    options = {"labels": labels, "seed": 0, "batch_size": batch or total, "precision": precision, "compile": compile}
    started = time.perf_counter()
    model.generate(**{**options, "seed": 1})
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    again = model.generate(**options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sample_s = time.perf_counter() - started
    return {
        "stage": sampler_stage(run, total),
        "slices": total,
        "first_call_s": round(first_s, 1),
        "slices_per_s": round(total / sample_s, 1),
        "rmse_vs_fp32": round(float(((again.images - reference) ** 2).mean().sqrt()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--out", type=Path, required=True, help="work directory (its demo store and model)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of the script")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, of {', '.join(PARTS)} (default: all; sampler reuses OUT's model when end-to-end "
        "is left out, so a short session can split the run in two)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"unknown part(s) {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (is the CUDA build of torch installed?)")
    if "end-to-end" in parts:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    print(json.dumps(machine), flush=True)
    rows = Rows()
    # what compiles comes last in each part (minutes of compilation): a run cut short loses the least
    if "dp-step" in parts:  # cpu-small also in one pass of 512 patients (--physical-batch-size 512: a GPU's size)
        for preset in [get_preset(name) for name in ("cpu-small", "gpu", "cpu-3d", "gpu-3d")] + [ONE_PASS]:
            rows.attempt(dp_stage(preset), partial(dp_step_seconds, preset, device, args.quick))
        rows.attempt("public_prior_step", lambda: public_prior_step_seconds(device, args.quick))
    model_dir: Path | None = args.out / "model"
    if "end-to-end" in parts:
        model_dir = end_to_end(args.out, device, args.quick, args.workers, rows)
    if "sampler" in parts and model_dir is not None:
        rows.attempt("sampler", partial(sampler_and_filter, model_dir, device, args.quick, rows))
    if "dp-step-compiled" in parts:  # `train --compile` (padded passes of one shape; CUDA graphs on a GPU)
        for preset in (replace(ONE_PASS, compile=True, fixed_shape=True), get_preset("gpu", compile=True)):
            rows.attempt(dp_stage(preset), partial(dp_step_seconds, preset, device, args.quick))
    print(f"\n{json.dumps(machine)}\n\n| stage | result |\n| --- | --- |")
    for row in rows:
        detail = {k: v for k, v in row.items() if k != "stage" and not isinstance(v, (list, dict))}
        print(f"| {row['stage']} | {', '.join(f'{k} {v}' for k, v in detail.items())} |")


if __name__ == "__main__":
    main()
