"""Membership-inference attacks on a generator and the ceiling (ε, δ)-DP puts on any such attack.

Two attacks, both scored per PATIENT (the unit of privacy) by averaging over the patient's slices:

- **loss attack** (white box): a member's slices are denoised better than a non-member's. Score = minus
  the diffusion loss at fixed timesteps with fixed noise, each timestep z-scored over all candidates.
- **Monte-Carlo distance attack** (black box, Hilprecht et al. 2019): a member has more generated samples
  in a small ball around it. Score = fraction of generated samples within a radius of the candidate
  (radius = a low quantile of all candidate→sample distances), ties broken by the nearest distance.

The DP bound: for any test of "member or not" against an (ε, δ)-DP mechanism,
``TPR ≤ min(1, e^ε·FPR + δ, 1 − e^(−ε)·(1 − δ − FPR))``, and it holds for every (ε, δ) pair on the
mechanism's privacy curve, so the tightest bound is the minimum over the curve (Kairouz et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from generators.errors import InvalidInput

LOW_FPR = 0.01


# ------------------------------------------------------------------------------------ attack scores
def loss_scores(losses: np.ndarray) -> np.ndarray:
    """Membership score of each image from its losses ``[T, N]`` at T fixed noise levels.

    The generator measures the losses (:meth:`generators.base.Generator.membership_losses`); the score is
    −(loss z-scored within each noise level), averaged over the levels: higher = more likely a member.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] == 0:
        raise InvalidInput("losses must be [timesteps, images] with at least one image")
    z = (losses - losses.mean(1, keepdims=True)) / (losses.std(1, keepdims=True) + 1e-12)
    return -z.mean(0)


def monte_carlo_scores(
    candidates: np.ndarray, generated: np.ndarray, *, quantile: float = 0.01
) -> tuple[np.ndarray, float]:
    """Hilprecht-style Monte-Carlo attack in an embedding space.

    Args:
        candidates: ``[N, D]`` embeddings of the records under attack; generated: ``[M, D]`` of samples.
        quantile: the ball radius is this quantile of all candidate→sample distances.
    Returns:
        ``(scores [N], radius)``; score = fraction of samples within the radius, ties broken by the
        (smaller) nearest distance.
    """
    if len(candidates) == 0 or len(generated) == 0:
        raise InvalidInput("the Monte-Carlo attack needs candidates and generated samples")
    c = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    g = torch.from_numpy(np.ascontiguousarray(generated, dtype=np.float32))
    blocks = [torch.cdist(c[i : i + 2048], g) for i in range(0, len(c), 2048)]  # (N, M) in blocks
    dist = torch.cat(blocks).numpy()
    radius = float(np.quantile(dist, quantile))
    within = (dist <= radius).mean(1)
    nearest = dist.min(1)
    return within - 1e-6 * nearest / (nearest.max() + 1e-12), radius


def per_patient(scores: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average slice scores per patient: ``(unique patient ids, mean score)``."""
    ids, inverse = np.unique(np.asarray(patients), return_inverse=True)
    totals = np.bincount(inverse, weights=scores, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids))
    return ids, totals / counts


# ------------------------------------------------------------------------------------- ROC metrics
def attack_roc(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, low_fpr: float = LOW_FPR) -> dict:
    """ROC of a membership attack: AUC, TPR at ``low_fpr`` (largest TPR with FPR ≤ low_fpr), the curve."""
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise InvalidInput("an attack ROC needs members and non-members")
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_low_fpr": float(tpr[fpr <= low_fpr].max()),
        "low_fpr": low_fpr,
        "n_members": len(member_scores),
        "n_nonmembers": len(nonmember_scores),
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
    }


def dp_tpr_bound(fpr: np.ndarray | float, privacy_curve: Sequence[tuple[float, float]]) -> np.ndarray:
    """Largest TPR any membership test can reach at ``fpr`` against a mechanism with these (ε, δ) pairs."""
    if not privacy_curve:
        raise InvalidInput("the privacy curve needs at least one (epsilon, delta) pair")
    x = np.asarray(fpr, dtype=np.float64)
    bound = np.ones_like(x)
    for eps, delta in privacy_curve:
        upper = np.minimum(np.exp(eps) * x + delta, 1.0 - np.exp(-eps) * (1.0 - delta - x))
        bound = np.minimum(bound, upper)
    return np.clip(np.maximum(bound, x), 0.0, 1.0)  # never below chance: a test can always guess


def dp_auc_bound(privacy_curve: Sequence[tuple[float, float]], *, points: int = 20001) -> float:
    """Largest ROC AUC any membership test can reach (area under :func:`dp_tpr_bound`)."""
    x = np.linspace(0.0, 1.0, points)
    return float(np.trapezoid(dp_tpr_bound(x, privacy_curve), x))
