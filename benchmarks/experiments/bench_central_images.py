"""How much of the label can DP class means carry? (lever 6 of the utility work: DP-FETA's "central images").

DP-FETA spends a small part of ε on the Gaussian mechanism over per-class pixel means (and variances) and
warm-starts the generator on images drawn from them before DP-SGD. Whatever label information such a warm start
can hand on is bounded by what the central images themselves tell healthy from lesion apart. This script
measures that bound on held-out real slices:

- the exact (noise-free) class statistics of the training patients — the best case of any ε share;
- the same statistics released with the Gaussian mechanism at ``--share`` ε (add/remove one patient: each
  patient adds one clipped mean slice, centred on the public template's mean slice, and a 1 to its class's sum
  and count, so the joint release has sensitivity ``√(C² + 1)``; the variances come from a second release of
  clipped squared deviations). ``--pool`` releases average-pooled slices: fewer pixels, less noise in all.

For each it prints the accuracy, on the held-out patients' slices, of the Bayes classifier of the central images'
own distribution (independent Gaussian pixels per class, equal priors): the accuracy a classifier trained on
samples of the central images reaches on real data at best. It also prints the size of the class-mean
difference against the release's noise.

It reads private data and prints statistics of it: run it on the demo cohort, not on a hospital's store; nothing
it computes is a release. ``--seed`` repeats a run's noise draws (default: OS entropy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from train.accounting import public_default_delta, solve_noise_multiplier
from train.public_prior import template_images
from train.store import CohortStore

VARIANCE_FLOOR = 1e-4  # background pixels are constant: keep the Gaussian log-likelihood finite


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--share", type=float, action="append", default=None, help="ε of the release (repeat)")
    parser.add_argument("--clip", type=float, default=8.0, help="L2 clip of a patient's centred mean slice")
    parser.add_argument(
        "--pool",
        type=int,
        default=1,
        help="average-pool slices by this factor before release (fewer, less noisy pixels)",
    )
    parser.add_argument("--draws", type=int, default=20, help="noise draws per ε share")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise draws (default: OS entropy)")
    args = parser.parse_args()
    if any(share <= 0 for share in args.share or []) or args.clip <= 0 or args.draws < 1 or args.pool < 1:
        parser.error("--share and --clip must be positive, --draws and --pool at least 1")
    return args


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
    """``[N, 1, H, W]`` slices average-pooled by ``factor`` and flattened to ``[N, H·W / factor²]``."""
    n, _, h, w = images.shape
    x = np.asarray(images, dtype=np.float64).reshape(n, h // factor, factor, w // factor, factor)
    return x.mean(axis=(2, 4)).reshape(n, -1)


def patient_means(images: np.ndarray, labels: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mean of each patient's flattened slices ``images [N, P]``, and the patient's label."""
    ids, inverse = np.unique(patients, return_inverse=True)
    sums = np.zeros((len(ids), images.shape[1]))
    np.add.at(sums, inverse, images)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    label = np.zeros(len(ids), dtype=np.int64)
    label[inverse] = labels
    return sums / counts, label


def class_statistics(x: np.ndarray, y: np.ndarray, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact per-class pixel mean and variance (floored like the release's)."""
    return [(x[y == c].mean(0), np.maximum(x[y == c].var(0), VARIANCE_FLOOR)) for c in range(n_classes)]


def released_statistics(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, centre: np.ndarray, clip: float, sigma: float, rng
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-class mean and variance from a Gaussian-mechanism release of clipped first and second moments.

    The two moments are released separately, each at noise multiplier ``sigma`` (a two-entry history). Squared
    deviations are clipped elementwise to ``clip / √d``, so each patient's vector of them has norm ≤ ``clip``.
    """
    d = x.shape[1]
    dev = x - centre
    norms = np.linalg.norm(dev, axis=1, keepdims=True)
    dev = dev * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    square = np.minimum(dev**2, clip / np.sqrt(d))  # ‖square‖₂ ≤ clip
    sensitivity = np.sqrt(clip**2 + 1.0)
    out = []
    for c in range(n_classes):
        rows = y == c
        count = rows.sum() + rng.normal(0.0, sigma * sensitivity)
        first = dev[rows].sum(0) + rng.normal(0.0, sigma * sensitivity, d)
        second = square[rows].sum(0) + rng.normal(0.0, sigma * sensitivity, d)
        n = max(count, 1.0)
        mean = first / n
        out.append((centre + mean, np.maximum(second / n - mean**2, VARIANCE_FLOOR)))
    return out


def bayes_accuracy(stats: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy on ``x`` of the independent-Gaussian Bayes classifier of ``stats`` (equal class priors), with each
    class's own pixel variances and with their pooled average (a linear rule: only the means differ)."""
    shared = np.mean([v for _, v in stats], axis=0)
    own = np.stack([-0.5 * (((x - m) ** 2) / v + np.log(v)).sum(1) for m, v in stats], axis=1)
    linear = np.stack([-0.5 * (((x - m) ** 2) / shared).sum(1) for m, _ in stats], axis=1)
    return float((own.argmax(1) == y).mean()), float((linear.argmax(1) == y).mean())


def main() -> None:
    args = parse_args()
    store = CohortStore.open(args.store)
    n_classes = len(store.label_names)
    if store.spatial_dims != 2 or n_classes != 2 or store.image_size % args.pool:
        raise SystemExit(
            f"needs a 2-D store with two labels and a --pool that divides its slice size {store.image_size}"
        )
    train, holdout = store.read("train"), store.read("holdout")
    x, y = patient_means(pooled(train.images, args.pool), train.labels, train.patients)
    x_test = pooled(holdout.images, args.pool)
    y_test = holdout.labels
    exact = class_statistics(x, y, n_classes)
    diff = exact[1][0] - exact[0][0]
    print(f"training patients {len(x)}, held-out slices {len(x_test)}, pixels {x.shape[1]}")
    print(f"class-mean difference: L2 {np.linalg.norm(diff):.3f}, max |pixel| {np.abs(diff).max():.4f}")
    own, linear = bayes_accuracy(exact, x_test, y_test)
    print(f"exact central images: Bayes accuracy on held-out slices {own:.3f} (pooled variances: {linear:.3f})")
    centre = pooled(template_images(store.image_size).mean(0, keepdim=True).numpy(), args.pool)[0]  # public
    norms = np.linalg.norm(x - centre, axis=1)
    print(
        f"patients' centred norms: median {np.median(norms):.2f}, share above the clip {np.mean(norms > args.clip):.2f}"
    )
    delta = public_default_delta(store.patients_estimate)
    rng = np.random.default_rng(args.seed)
    for share in args.share or [0.5, 1.0, 2.0]:
        sigma = solve_noise_multiplier(target_epsilon=share, delta=delta, sample_rate=1.0, steps=2)
        noise = np.sqrt(2.0) * sigma * np.sqrt(args.clip**2 + 1.0) / (len(x) / n_classes)
        accuracy = np.array(
            [
                bayes_accuracy(
                    released_statistics(x, y, n_classes, centre=centre, clip=args.clip, sigma=sigma, rng=rng),
                    x_test,
                    y_test,
                )
                for _ in range(args.draws)
            ]
        )
        print(
            f"ε share {share}: σ {sigma:.2f}, noise sd of the mean difference per pixel ≈ {noise:.3f} "
            f"(L2 ≈ {noise * np.sqrt(x.shape[1]):.2f}); Bayes accuracy {accuracy[:, 0].mean():.3f} ± "
            f"{accuracy[:, 0].std():.3f} (pooled variances: {accuracy[:, 1].mean():.3f} ± {accuracy[:, 1].std():.3f})"
        )


if __name__ == "__main__":
    main()
