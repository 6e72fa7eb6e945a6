"""A DP-GAN baseline against the DP diffusion model (lever 6 of the utility work), scored like ``--quick``.

Trains a small class-conditional GAN on the store's 32 px slices with patient-level DP and prints the quick audit
of ``bench_utility.py --quick`` for its samples (TSTR/TRTR and Fréchet ratios on ``--n`` unfiltered samples per
label, the same classifier budget and seeds), so the row sits next to the diffusion recipes'.

Privacy, as in ``train.dp_training``: only the discriminator reads private data. Each step Poisson-samples patients
at ``q = B / N̂`` (Opacus ``UniformWithReplacementSampler``, OS-entropy generator), takes one random slice of each,
computes each patient's gradient of the real half of the hinge loss exactly (``torch.func``), and Opacus'
``DPOptimizer`` clips it to ``C``, adds 𝒩(0, σ²C²) in secure mode and averages over the expected batch. The fake
half of the discriminator's loss and the generator's update read only the generator's samples and the
discriminator's (already private) weights: post-processing, no ε. σ is solved for the target ε with the store's
DP patient count composed in (``train.accounting.plan_privacy``), and the ε printed at the end is the one Opacus'
accountant recorded step by step. ``--no-dp`` trains the same networks without DP: the architecture's ceiling.

Before DP, both networks may train non-privately on the public MNI152 template (augmented like the diffusion
prior's slices, labels drawn at random: the template carries none) — ``--prior-steps``. ``--seed`` fixes only
that public part and the networks' initialisation.

It reads private data and writes samples that have not passed the memorization filter: run it on the demo
cohort, not on a hospital's store; nothing it writes is a release.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_utility import score_columns, score_samples  # scripts run from benchmarks/, which Python puts on the path
from opacus.accountants import create_accountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from app.audit import AuditSettings, Synthetic, load_real
from generators.base import save_grid
from generators.errors import SynthCohortError
from train.accounting import count_mechanism, epsilon_of, plan_privacy
from train.dp_training import PatientSlices, make_dp_optimizer, private_generator
from train.preprocess import resize_images
from train.public_prior import augment, template_images
from train.store import CohortStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, the shared helpers
from common import machine

SIZE = 32  # the CPU presets' resolution
LATENT = 64


class Generator(nn.Module):
    """Latent + label embedding → 4×4 → three (upsample, conv, norm, SiLU) stages → 32×32, tanh."""

    def __init__(self, n_classes: int, width: int = 64, norm: str = "group") -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(n_classes, LATENT)
        self.project = nn.Linear(2 * LATENT, width * 16)

        def normalise(channels: int) -> nn.Module:  # batch statistics are harmless here: no private data
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(8, channels)

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, padding=1), normalise(c_out), nn.SiLU()
            )

        self.body = nn.Sequential(stage(width, width), stage(width, width // 2), stage(width // 2, width // 4))
        self.out = nn.Conv2d(width // 4, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(labels)], dim=1)).view(-1, self.width, 4, 4)
        return torch.tanh(self.out(self.body(h)))


class Discriminator(nn.Module):
    """Three strided convs (LeakyReLU, no batch statistics: per-patient gradients stay per patient) and a
    projection head: score = w·h + embed(label)·h (Miyato & Koyama 2018)."""

    def __init__(self, n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        features = 4 * width * (SIZE // 8) ** 2
        self.head = nn.Linear(features, 1)
        self.embed = nn.Embedding(n_classes, features)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h).squeeze(1) + (self.embed(labels) * h).sum(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl and sample grids go here")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--no-dp", action="store_true", help="train without DP (the architecture's ceiling)")
    parser.add_argument("--batch", type=int, default=64, help="expected patients per discriminator step")
    parser.add_argument("--steps", type=int, default=2000, help="discriminator (= generator) steps")
    parser.add_argument("--clip", type=float, default=1.0, help="per-patient clipping norm C")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of both networks")
    parser.add_argument("--prior-steps", type=int, default=1000, help="non-private steps on the public template")
    parser.add_argument("--d-width", type=int, default=16, help="discriminator channels (×1, ×2, ×4)")
    parser.add_argument("--g-width", type=int, default=64, help="generator channels (×1, ×1, ×½, ×¼)")
    parser.add_argument("--g-norm", choices=("group", "batch"), default="group", help="generator normalisation")
    parser.add_argument("--mode-seeking", type=float, default=0.0, help="λ of the generator's mode-seeking term")
    parser.add_argument(
        "--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas of both networks (SNGAN: 0 0.9)"
    )
    parser.add_argument("--n", type=int, default=300, help="samples per label for the quick audit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="public seed: initialisation and the public prior")
    args = parser.parse_args()
    if min(args.batch, args.steps, args.n, args.threads, args.d_width, args.g_width) < 1 or args.prior_steps < 0:
        parser.error("--batch, --steps, --n, --threads and the widths must be at least 1, --prior-steps at least 0")
    if args.clip <= 0 or args.lr <= 0 or args.epsilon <= 0 or args.mode_seeking < 0:
        parser.error("--clip, --lr and --epsilon must be positive, --mode-seeking not negative")
    if args.g_width % 32:
        parser.error("--g-width must be a multiple of 32 (GroupNorm of 8 groups at a quarter of it)")
    return args


def hinge_real(d: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - d(x, y)).mean()


def hinge_fake(d: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 + d(x, y)).mean()


def generator_step(g: nn.Module, d: nn.Module, g_opt: torch.optim.Optimizer, args, n_classes: int, gen) -> None:
    """One generator update against the current discriminator (reads no data). With ``--mode-seeking λ`` two latents
    per label are drawn and λ / (|G(z₁) − G(z₂)| / |z₁ − z₂|) is added (Mao et al. 2019, against mode collapse)."""
    half = max(1, args.batch // 2)
    y = torch.randint(0, n_classes, (half,), generator=gen).repeat(2)
    z = torch.randn(2 * half, LATENT, generator=gen)
    fake = g(z, y)
    loss = -d(fake, y).mean()
    if args.mode_seeking:
        spread = (fake[:half] - fake[half:]).abs().mean() / (z[:half] - z[half:]).abs().mean()
        loss = loss + args.mode_seeking / (spread + 1e-5)
    g_opt.zero_grad(set_to_none=True)
    loss.backward()
    g_opt.step()


def fake_batch(g: nn.Module, batch: int, n_classes: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, n_classes, (batch,), generator=gen)
    with torch.no_grad():
        return g(torch.randn(batch, LATENT, generator=gen), y), y


def public_prior(g, d, g_opt, d_opt, args, n_classes: int) -> None:
    """Non-private GAN steps on the augmented public template, random labels."""
    if not args.prior_steps:
        return
    gen = torch.Generator().manual_seed(args.seed)
    template = template_images(SIZE, 2)
    for _ in tqdm(range(args.prior_steps), desc="public prior", mininterval=10):
        real = augment(template[torch.randint(0, len(template), (args.batch,), generator=gen)], gen)
        y = torch.randint(0, n_classes, (args.batch,), generator=gen)
        fake, fake_y = fake_batch(g, args.batch, n_classes, gen)
        d_opt.zero_grad(set_to_none=True)
        (hinge_real(d, real, y) + hinge_fake(d, fake, fake_y)).backward()
        d_opt.step()
        generator_step(g, d, g_opt, args, n_classes, gen)


def dp_phase(g, d, g_opt, d_opt, args, store: CohortStore) -> dict:
    """Patient-level DP discriminator steps (or the same without DP), each followed by a generator step."""
    split = store.read("train")
    slices = PatientSlices(split.patients, split.labels)
    n_classes = len(store.label_names)
    draw, public = private_generator(), torch.Generator().manual_seed(args.seed + 1)
    if args.no_dp:
        sample_rate, plan, optimizer = min(1.0, args.batch / store.patients_estimate), None, d_opt  # N̂, as with DP
    else:
        count = count_mechanism(float(store.meta["patients_estimate"]["noise_std"]))
        delta = float(store.meta["budget"]["delta"])
        plan = plan_privacy(
            target_epsilon=args.epsilon,
            delta=delta,
            patients_estimate=store.patients_estimate,
            batch_size=args.batch,
            steps=args.steps,
            prior=[count],
        )
        sample_rate = plan.sample_rate
        optimizer = make_dp_optimizer(d_opt, plan, max_grad_norm=args.clip, generator=private_generator())
        accountant = create_accountant("prv")
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    sampler = UniformWithReplacementSampler(
        num_samples=slices.n_patients, sample_rate=sample_rate, generator=private_generator(), steps=args.steps
    )
    params = {name: p for name, p in d.named_parameters()}

    def patient_loss(p, x, y):  # one patient's real term: (1, 1, H, W), (1,)
        return hinge_real(lambda a, b: functional_call(d, p, (a, b)), x, y)

    per_patient = vmap(grad(patient_loss), in_dims=(None, 0, 0))
    started = time.perf_counter()
    for ids in tqdm(sampler, total=args.steps, desc="DP-GAN" if plan else "GAN (no DP)", mininterval=10):
        ids = torch.tensor(ids, dtype=torch.long)
        rows = slices.pick(ids, draw).numpy()
        real = resize_images(split.images[rows], SIZE)
        y = slices.labels[ids]
        fake, fake_y = fake_batch(g, args.batch, n_classes, public)
        optimizer.zero_grad(set_to_none=True)
        if plan is None:
            loss = hinge_fake(d, fake, fake_y) + (hinge_real(d, real, y) if len(ids) else 0.0)
            loss.backward()
            optimizer.step()
        else:
            detached = {n: p.detach() for n, p in params.items()}
            grads = per_patient(detached, real[:, None], y[:, None]) if len(ids) else {}
            for name, p in params.items():
                p.grad_sample = grads[name] if len(ids) else torch.zeros(0, *p.shape)
            if optimizer.pre_step():  # clip, noise, average over the expected batch; the accountant's hook
                fake_grads = torch.autograd.grad(hinge_fake(d, fake, fake_y), list(params.values()))
                for p, extra in zip(params.values(), fake_grads, strict=True):
                    p.grad.add_(extra)  # the fake half reads no data: added after the noise, free
                optimizer.original_optimizer.step()
        generator_step(g, d, g_opt, args, n_classes, public)
    result = {"dp_seconds": time.perf_counter() - started, "sample_rate": sample_rate, "steps": args.steps}
    if plan is not None:
        result |= {
            "sigma": plan.noise_multiplier,
            "epsilon": epsilon_of([count, *accountant.history], delta=delta),
            "delta": delta,
            "accountant_history": accountant.history,
        }
    return result


def quick_scores(store: CohortStore, g: nn.Module, n: int, out: Path) -> dict:
    """``bench_utility``'s quick audit for ``n`` samples per label of ``g`` (sample grids into ``out``)."""
    names = list(store.label_names)
    label_ids = {name: i for i, name in enumerate(names)}
    real = load_real(store, SimpleNamespace(label_ids=label_ids, image_shape=(SIZE, SIZE)))
    labels = torch.arange(len(names)).repeat_interleave(n)
    gen = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        images = torch.cat([g(torch.randn(len(chunk), LATENT, generator=gen), chunk) for chunk in labels.split(256)])
    for i, name in enumerate(names):
        save_grid(images[labels == i][:64], out / f"samples_{name}.png")
    synthetic = Synthetic(images.numpy(), labels.numpy())
    return score_samples(real, synthetic, names, AuditSettings(n=n, classifier_seeds=2), SIZE, 2)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    try:
        store = CohortStore.open(args.store)
    except SynthCohortError as err:  # a missing or corrupt store: one clear line
        raise SystemExit(f"error: {err}") from None
    if store.spatial_dims != 2:
        raise SystemExit("the DP-GAN baseline trains on 2-D slices; this store holds volumes")
    args.out.mkdir(parents=True, exist_ok=True)
    n_classes = len(store.label_names)
    torch.manual_seed(args.seed)
    g, d = Generator(n_classes, args.g_width, args.g_norm), Discriminator(n_classes, args.d_width)
    g_opt = torch.optim.Adam(g.parameters(), lr=args.lr, betas=tuple(args.betas))
    d_opt = torch.optim.Adam(d.parameters(), lr=args.lr, betas=tuple(args.betas))
    started = time.perf_counter()
    public_prior(g, d, g_opt, d_opt, args, n_classes)
    prior_seconds = time.perf_counter() - started
    training = dp_phase(g, d, g_opt, d_opt, args, store)
    g.eval()
    report = quick_scores(store, g, args.n, args.out)
    row = {
        "recipe": "dp-gan" if not args.no_dp else "gan-no-dp",
        "date": date.today().isoformat(),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "discriminator_parameters": sum(p.numel() for p in d.parameters()),
        "generator_parameters": sum(p.numel() for p in g.parameters()),
        "prior_seconds": prior_seconds,
        **training,
        **score_columns(report),  # tstr, trtr, their ratio, Fréchet ratios, synthetic MS-SSIM per label
        "ms_ssim_real": {k: round(v, 3) for k, v in report["fidelity"]["ms_ssim"]["real"].items()},
    }
    with (args.out / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("args", "accountant_history")}, indent=1))


if __name__ == "__main__":
    main()
