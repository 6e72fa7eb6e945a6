"""Does the public prior draw its own public data? Fréchet distance of its null-class samples to the augmented template.

Public data only: the prior (a preset's network after ``train.public_prior.pretrain``, or a cached prior file from
``bench_utility``'s ``--out/priors``) is sampled with guidance 0 (the null class, which is what it was trained as),
and its samples are compared, in the audit's fixed filter embedding, with augmented MNI152 template slices
(``train.public_prior.augment``); a second augmented set gives the floor. No store is read, so the prior can be
tuned on this number without looking at any patient. Writes a PNG of 16 samples over 16 augmented slices.

    .venv/bin/python benchmarks/experiments/bench_public_prior.py --preset cpu-small --steps 800 --png prior.png
    .venv/bin/python benchmarks/experiments/bench_public_prior.py --preset cpu-small \\
        --cached bench_runs/X/priors/prior-….pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.audit import FEATURE_EMBEDDING
from generators.card import ModelCard
from generators.diffusion import noise_schedule, training_scheduler
from generators.unet import null_class
from privacy_filters.embeddings import embed, make_embedding
from privacy_filters.fidelity import frechet_distance
from train.dp_training import build_network, wrap_generator
from train.presets import get_preset
from train.public_prior import augment, pretrain, template_images

LABELS = ("healthy", "lesion")  # the demo's two labels: only the null class is sampled


def prior_network(args: argparse.Namespace) -> torch.nn.Module:
    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    network = build_network(preset, len(LABELS))
    if args.cached:
        network.load_state_dict(torch.load(args.cached, map_location="cpu", weights_only=True))
        return network
    started = time.perf_counter()
    pretrain(
        network,
        images=template_images(preset.image_size),
        steps=args.steps or preset.public_pretrain_steps,
        batch_size=args.batch or preset.public_batch_size,
        learning_rate=args.lr or preset.public_learning_rate,
        alphas_cumprod=noise_schedule(training_scheduler(preset.prediction)),  # type: ignore[arg-type]
        prediction=preset.prediction,  # type: ignore[arg-type]
        null_label=null_class(len(LABELS)),
        seed=args.seed + 4,  # as training seeds its prior
        device=torch.device("cpu"),
    )
    print(f"prior trained in {time.perf_counter() - started:.0f} s", flush=True)
    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--cached", type=Path, help="a cached prior state dict instead of training one")
    parser.add_argument("--steps", type=int, help="prior steps (default: the preset's)")
    parser.add_argument("--batch", type=int, help="prior batch (default: the preset's)")
    parser.add_argument("--lr", type=float, help="prior peak learning rate (default: the preset's)")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="public seed, as train's --seed")
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()

    preset = get_preset(args.preset)
    card = ModelCard.model_construct(  # a sampling-only card: never saved, so not validated
        generator="diffusion-2d",
        spatial_dims=2,
        labels={name: i for i, name in enumerate(LABELS)},
        covariates=None,
        image_size=preset.image_size,
        dp=False,
        sampler={},
    )
    model = wrap_generator(preset, prior_network(args), card, "cpu")
    samples = model.generate(labels=[LABELS[0]] * args.n, seed=3, guidance=0.0).images.numpy()
    generator, template = torch.Generator().manual_seed(11), template_images(preset.image_size)
    references = [
        augment(template[torch.randint(0, len(template), (args.n,), generator=generator)], generator).numpy()
        for _ in range(2)
    ]
    embedding = make_embedding(FEATURE_EMBEDDING, preset.image_size, 2)
    drawn, first, second = (embed(embedding, x) for x in (samples, *references))
    print(
        f"FD (filter embedding) prior samples vs augmented template {frechet_distance(drawn, first):.5f}; "
        f"floor, two augmented sets {frechet_distance(first, second):.5f}",
        flush=True,
    )
    if args.png:
        grid = np.concatenate([np.concatenate(list(x[:16, 0]), 1) for x in (samples, references[0])], 0)
        Image.fromarray(((grid + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(args.png)


if __name__ == "__main__":
    main()
