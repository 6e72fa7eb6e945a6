"""Per-patient gradient norms of the DP loss against the clipping norm C (a benchmark, never part of a release).

DP-SGD adds 𝒩(0, σ²C²) to the sum of the patients' clipped gradients. A patient whose gradient norm is below C
contributes less than C of signal against the same noise, so C far above the typical norm wastes privacy
budget. This script prints the quantiles of the per-patient gradient norms (``m`` slices, one (timestep, noise)
draw each, exactly as training draws them, from OS entropy) at the start of DP training (the public prior, random label
embeddings) and, with ``--checkpoint``, for the weights of a training checkpoint (``MODEL/private/checkpoint.pt``).

It reads private data and prints statistics of it: run it on the demo cohort, not on a hospital's store.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from generators.diffusion import noise_schedule, training_scheduler
from train.dp_training import TrainConfig, draw_terms, initial_state, plan_run, private_generator
from train.per_patient_grads import make_per_patient_grad_fn
from train.presets import get_preset
from train.store import CohortStore

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--prior-cache", type=Path, required=True, help="directory of cached public priors")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[], help="a training checkpoint (repeat)")
    parser.add_argument("--patients", type=int, default=128)
    parser.add_argument("--slices", type=int, action="append", default=None, help="m (repeat; default 1 and 4)")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def patient_norms(run, model: torch.nn.Module, m: int, n: int, gen: torch.Generator) -> np.ndarray:
    """Norms of ``n`` random patients' whole gradients (all trainable parameters), 32 at a time."""
    preset = run.config.preset
    alphas = noise_schedule(training_scheduler(preset.prediction))
    grad_fn = make_per_patient_grad_fn(model, alphas, preset.prediction)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    norms = []
    for start in range(0, n, 32):
        ids = torch.randint(0, run.slices.n_patients, (min(32, n - start),), generator=gen)
        grads, _ = grad_fn(params, *draw_terms(run, ids, gen, m=m, k=m, n_timesteps=len(alphas)))
        norms.append(torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in grads.values())))
    return torch.cat(norms).numpy()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    config = TrainConfig(
        store=args.store,
        out=Path(tempfile.mkdtemp()) / "model",
        preset=preset,
        epsilon=8.0,
        prior_cache=args.prior_cache,
        allow_over_budget=True,
        force=True,
    )
    run = plan_run(config, CohortStore.open(args.store))
    state = initial_state(run, None)  # the cached public prior (trained here when not cached)
    weights = [("public prior, random label embeddings", None)] + [(str(c), c) for c in args.checkpoint]
    print(f"preset {preset.name}: C = {preset.max_grad_norm}; quantiles {QUANTILES}")
    for name, checkpoint in weights:
        if checkpoint is not None:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
            state.model.load_state_dict(saved["model"])
            name = f"{name} (step {saved['step']})"
        for m in args.slices or [1, 4]:
            norms = patient_norms(run, state.model, m, args.patients, private_generator())
            quantiles = np.round(np.quantile(norms, QUANTILES), 3).tolist()
            clipped = float((norms > preset.max_grad_norm).mean())
            print(f"{name}, m = {m}: norm quantiles {quantiles}; share clipped at C: {clipped:.2f}", flush=True)


if __name__ == "__main__":
    main()
