"""A DP label critic as a sample filter: does keeping only the samples a DP classifier assigns to their label help?

The critic is the audit's small CNN (``privacy_filters.audit_classifier.SmallCNN``):
1. **public pretext** (no ε): trained to tell augmented MNI152 template slices from the same slices with generic
   focal anomalies (``train.public_prior.add_focal_anomalies``: public data and a generic augmentation, never the
   demo cohort's own lesion model);
2. **patient-level DP-SGD** (ε_c): only its last two layers (``features``, ``head``: 4 290 parameters) are trained on
   the store's training patients — Poisson sampling of patients at ``q = B / N̂``, ``m`` slices per patient averaged
   before the patient's gradient is clipped to ``C``, Gaussian noise σC drawn from OS entropy; σ is solved so that
   the critic alone spends ``--critic-epsilon``, and the composed ε of the model's own history plus the critic's
   is printed (PRV accountant): the price of the filter in the one budget a privacy officer reads.
3. The model generates ``--over`` × ``--n`` samples per label (public sample seed); the quick audit
   (``bench_utility``: TSTR/TRTR, Fréchet ratios, MS-SSIM) scores the first ``n`` per label (unfiltered) and the
   ``n`` per label the critic gives the highest probability of their own label (filtered).

``--validate`` first scores the critic on a seeded fifth of the TRAINING patients (trained on the rest), never on
the held-out patients. Runs on the demo store and prints accuracies computed from it: never on a hospital's store.

    .venv/bin/python benchmarks/experiments/bench_label_critic.py --store demo/store --model MODEL_DIR \\
        --critic-epsilon 3
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from bench_utility import score_columns, score_samples  # scripts run from benchmarks/, which Python puts on the path
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.func import functional_call, grad, vmap

from app.audit import AuditSettings, Synthetic, load_real
from generators.card import read_card
from generators.registry import load_generator
from privacy_filters import audit_classifier as clf
from train.accounting import count_mechanism, epsilon_of, plan_privacy
from train.dp_training import PatientSlices, make_dp_optimizer, private_generator
from train.preprocess import resize_split
from train.public_prior import add_focal_anomalies, augment, template_images
from train.store import CohortStore

TUNED = ("features", "head")  # the critic's layers DP-SGD trains; the public pretext trained them all


def public_pretext(size: int, steps: int, seed: int) -> clf.SmallCNN:
    """Train the critic to tell template slices with generic focal anomalies from those without (public data)."""
    torch.manual_seed(seed)
    model = clf.SmallCNN(2)
    images, generator = template_images(size), torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        batch = augment(images[torch.randint(0, len(images), (128,), generator=generator)], generator)
        anomalous = torch.rand(128, generator=generator) < 0.5
        batch = torch.where(anomalous.view(-1, 1, 1, 1), add_focal_anomalies(batch, generator, 1.0), batch)
        loss = torch.nn.functional.cross_entropy(model(batch), anomalous.long())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def dp_fine_tune(model: clf.SmallCNN, x: np.ndarray, y: np.ndarray, patients: np.ndarray, args, plan) -> None:
    """Patient-level DP-SGD of the ``TUNED`` layers in place: Opacus' Poisson sampler over patients and its DP
    optimiser (``train.dp_training.make_dp_optimizer``: clip each patient to ``C``, add noise, average)."""
    frozen = {k: v.detach() for k, v in model.named_parameters() if not k.startswith(TUNED)}
    frozen.update(dict(model.named_buffers()))
    params = {k: p for k, p in model.named_parameters() if k.startswith(TUNED)}
    images, targets = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    slices = PatientSlices(patients, y)

    def patient_loss(trainable, xs, ys):
        return torch.nn.functional.cross_entropy(functional_call(model, (trainable, frozen), (xs,)), ys)

    per_patient = vmap(grad(patient_loss), in_dims=(None, 0, 0))
    gen = private_generator()  # Poisson masks, slice picks, augmentation and DP noise: OS entropy
    optimiser = make_dp_optimizer(
        torch.optim.Adam(params.values(), lr=args.critic_lr), plan, max_grad_norm=args.clip, generator=gen
    )
    sampler = UniformWithReplacementSampler(
        num_samples=slices.n_patients, sample_rate=plan.sample_rate, generator=gen, steps=plan.steps
    )
    for sampled in sampler:
        chunks = [[torch.zeros(0, *p.shape)] for p in params.values()]  # an empty Poisson batch still steps
        for start in range(0, len(sampled), 128):
            picks = slices.pick(torch.as_tensor(sampled[start : start + 128]), gen, m=args.critic_m).numpy()
            xs = clf._augment(images[picks.reshape(-1)], gen).view(*picks.shape, *images.shape[1:])
            grads = per_patient({k: p.detach() for k, p in params.items()}, xs, targets[picks])
            for chunk, name in zip(chunks, params, strict=True):
                chunk.append(grads[name])
        for chunk, p in zip(chunks, params.values(), strict=True):
            p.grad_sample = torch.cat(chunk)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    model.eval()


def trained_critic(pretext: clf.SmallCNN, x, y, patients, args, plan) -> clf.SmallCNN:
    """A copy of the public ``pretext`` critic, DP fine-tuned on ``x``."""
    critic = copy.deepcopy(pretext)
    dp_fine_tune(critic, x, y, patients, args, plan)
    return critic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a trained 2-D model directory")
    parser.add_argument("--critic-epsilon", type=float, default=3.0)
    parser.add_argument("--critic-steps", type=int, default=100)
    parser.add_argument("--critic-batch", type=int, default=256, help="expected patients per DP step")
    parser.add_argument("--critic-m", type=int, default=4, help="slices per sampled patient")
    parser.add_argument("--critic-lr", type=float, default=5e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--pretext-steps", type=int, default=2000)
    parser.add_argument("--n", type=int, default=300, help="samples per label scored")
    parser.add_argument("--over", type=int, default=3, help="candidates per kept sample")
    parser.add_argument("--sample-seed", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7, help="public seed of the pretext task")
    parser.add_argument("--validate", action="store_true", help="first score the critic on a fifth of train patients")
    args = parser.parse_args()

    card = read_card(args.model)
    store = CohortStore.open(args.store)
    train = store.read("train")
    x = np.ascontiguousarray(resize_split(train.images, card.image_size), dtype=np.float32)
    y, patients = np.asarray(train.labels), np.asarray(train.patients)
    plan = plan_privacy(
        target_epsilon=args.critic_epsilon,
        delta=card.delta,
        patients_estimate=int(card.patients_estimate["value"]),
        batch_size=args.critic_batch,
        steps=args.critic_steps,
        prior=[count_mechanism(float(card.patients_estimate["noise_std"]))],
    )
    sigma, q = plan.noise_multiplier, plan.sample_rate
    composed = epsilon_of([*map(tuple, card.privacy_history), (sigma, q, plan.steps)], delta=card.delta)
    print(
        f"model ε {card.epsilon:.3f}; critic σ {sigma:.3f} (q {q:.3f}, {args.critic_steps} steps, alone ε "
        f"{args.critic_epsilon}); composed ε {composed:.3f} at δ {card.delta:g}",
        flush=True,
    )
    pretext = public_pretext(x.shape[-1], args.pretext_steps, args.seed)  # public: trained once, copied per use

    if args.validate:
        unique = np.unique(patients)
        val = np.isin(patients, np.random.default_rng(99).permutation(unique)[: len(unique) // 5])
        started = time.perf_counter()
        critic = trained_critic(pretext, x[~val], y[~val], patients[~val], args, plan)
        probs, _ = clf.predict(critic, x[val])
        s = clf.score(probs, y[val])
        print(
            f"critic on validation patients: accuracy {s.accuracy:.3f} AUC {s.auc:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    critic = trained_critic(pretext, x, y, patients, args, plan)
    model = load_generator(args.model, device="cpu")
    names = list(model.label_ids)
    labels = [name for name in names for _ in range(args.n * args.over)]
    images = model.generate(labels=labels, seed=args.sample_seed).images.numpy()
    ids = np.array([model.label_ids[name] for name in labels])
    probs, _ = clf.predict(critic, images)
    own = probs[np.arange(len(ids)), ids]
    first = np.concatenate([np.flatnonzero(ids == k)[: args.n] for k in range(len(names))])
    best = np.concatenate(
        [(idx := np.flatnonzero(ids == k))[np.argsort(-own[idx])][: args.n] for k in range(len(names))]
    )
    agree = {name: round(float((own[first][ids[first] == k] > 0.5).mean()), 3) for k, name in enumerate(names)}
    print(f"critic agrees with the label of {agree} of the unfiltered samples", flush=True)
    real = load_real(store, model)
    settings = AuditSettings(n=args.n, classifier_seeds=2)
    for name, keep in (("unfiltered", first), ("critic-filtered", best)):
        report = score_samples(real, Synthetic(images[keep], ids[keep]), names, settings, card.image_size, 2)
        print(name, score_columns(report), flush=True)


if __name__ == "__main__":
    main()
