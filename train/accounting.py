"""Privacy accounting for patient-level DP-SGD: pure functions over numbers, no training, no I/O.

Neighbouring relation: **add/remove one patient**. Everything a model's card publishes is a function of
public choices and of one differentially private release, never of the exact patient count ``N``:

1. At ingestion the store releases ``N̂ = N + 𝒩(0, s²)`` (the Gaussian mechanism on a count of
   sensitivity 1; ``s = COUNT_NOISE`` patients). That is one entry ``(s, 1, 1)`` of the privacy history.
2. Training Poisson-samples each patient with rate ``q = B / N̂`` (``B`` the public expected batch size),
   clips each sampled patient's gradient to ``C`` and adds ``𝒩(0, (σC)²)``: ``T`` entries ``(σ, q, 1)``.
   The DP-SGD guarantee under add/remove depends only on ``(σ, q, T)``, and all three come from ``N̂``.

A history is a list of Opacus accountant entries ``(noise multiplier, sample rate, steps)``; its (ε, δ) is
the composition computed by Opacus' PRV accountant (Gopi et al. 2021) or RDP accountant (Mironov et al.
2019). Composition across several models trained on one store uses the same call on the concatenated
histories (the ledger). Sampling from a trained model is post-processing and costs nothing.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from generators.errors import InvalidInput

ACCOUNTANTS = ("prv", "rdp")
RELATION = "add/remove one patient"
COUNT_NOISE = 10.0  # std (patients) of the DP patient count; costs ≈ +0.02 ε at ε = 8 (see BENCHMARKS.md)
MAX_SIGMA = 1e4
EPSILON_TOLERANCE = 0.01
MAX_SOLVER_EVALUATIONS = 60  # a guard only: the searches measured take 4–7 (BENCHMARKS.md)
MAX_STEP = math.log(4.0)  # the largest change of log σ while the answer is not yet bracketed
TYPICAL_SLOPE = 1.5  # −d log ε / d log σ of DP-SGD, about: the solver's first step, before two points measure it

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one Opacus history entry


def count_mechanism(noise: float = COUNT_NOISE) -> Mechanism:
    """The Gaussian mechanism on a count of sensitivity 1, as a history entry."""
    return (float(noise), 1.0, 1)


def noisy_count(n: int, *, noise: float = COUNT_NOISE, rng: random.Random | None = None) -> int:
    """``round(n + 𝒩(0, noise²))``, at least 1. ``rng`` defaults to OS entropy (``random.SystemRandom``)."""
    draw = (rng or random.SystemRandom()).gauss(0.0, noise)
    return max(1, round(n + draw))


def epsilon_of(history: Sequence[Mechanism], *, delta: float, accountant: str = "prv") -> float:
    """ε of the composition of every mechanism in ``history`` at ``delta`` (0 for an empty history)."""
    entries = tuple((float(s), float(q), int(t)) for s, q, t in history if int(t) > 0)
    return _epsilon(entries, float(delta), accountant) if entries else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon(entries: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    acc = _accountant_factory()(mechanism=accountant)
    acc.history = list(entries)
    # RDP's "optimal order is the largest alpha" note is not actionable here; PRV takes log(1 - q) = -inf for
    # the count release (q = 1) on purpose
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


@functools.cache
def _accountant_factory():
    """Opacus' ``create_accountant``, imported on first use: a process that never composes a history (export,
    calibrate, the service and its workers) skips Opacus' imports (~1.5 s, most of it torch.distributed).

    The RDP of one sampled-Gaussian step at one order is a pure function of (q, σ, α), and Opacus recomputes it on
    every ε: the PRV accountant sizes its domain with two RDP passes over 150 orders, the fractional ones by a slow
    series. The same (q, σ) recurs in a run's progress, its checkpoints, its card and the ledger, so the values are
    kept (the same numbers, computed once)."""
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):  # once, however often this module is reloaded
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(rdp._compute_rdp)
    return create_accountant


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior: Sequence[Mechanism] = (),
) -> float:
    """A σ such that ``prior + (σ, q, steps)`` spends between ``target_epsilon`` − ``EPSILON_TOLERANCE`` and
    ``target_epsilon``: the smallest σ, to the tolerance.

    ε(σ) falls about like a power of σ, so log ε is nearly a straight line in log σ: a secant search on that line,
    started from the Gaussian-DP estimate of σ, lands in the tolerance after 4–7 evaluations of the accountant
    (each ~0.3 s for PRV; BENCHMARKS.md). Once σ values on both sides of the target are known, a step that would
    leave them bisects instead, so the search always converges."""
    if epsilon_of(prior, delta=delta, accountant=accountant) >= target_epsilon:
        raise InvalidInput(f"ε = {target_epsilon} is already spent by the releases before training")
    aim = math.log(target_epsilon - EPSILON_TOLERANCE / 2)
    over = under = last = None  # (log σ, log ε − aim) spending over the target, under it, and the last evaluated
    x, ceiling = math.log(_gaussian_dp_sigma(target_epsilon, delta, sample_rate, steps)), math.log(MAX_SIGMA)
    for _ in range(MAX_SOLVER_EVALUATIONS):
        epsilon = epsilon_of([*prior, (math.exp(x), sample_rate, steps)], delta=delta, accountant=accountant)
        if target_epsilon - EPSILON_TOLERANCE <= epsilon <= target_epsilon:
            return math.exp(x)
        point = (x, math.log(epsilon) - aim)
        slope = (point[1] - last[1]) / (point[0] - last[0]) if last is not None and point[0] != last[0] else 0.0
        step = -point[1] / (slope if slope < 0 else -TYPICAL_SLOPE)
        last = point
        if epsilon > target_epsilon:
            if x >= ceiling:
                raise InvalidInput(f"ε = {target_epsilon} is too small for {steps} steps at q = {sample_rate:.3g}")
            over = point
        else:
            under = point
        if over is not None and under is not None:  # bracketed: stay inside, bisect where the secant would leave
            x = x + step if over[0] < x + step < under[0] else (over[0] + under[0]) / 2
        else:  # one side known: σ changes at most 4× a step
            x = min(x + max(-MAX_STEP, min(MAX_STEP, step)), ceiling)
    raise InvalidInput(f"no noise multiplier found for ε = {target_epsilon} at q = {sample_rate:.3g}, {steps} steps")


def _gaussian_dp_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ at which the Gaussian-DP (central limit) approximation of Poisson-sampled DP-SGD spends ``target_epsilon``
    (Opacus' GDP analysis, milliseconds an evaluation). Only the solver's starting point: it leaves out the prior
    releases and can be off by several per cent; the accountant decides. 1 where it cannot be computed."""
    from opacus.accountants.analysis import gdp
    from scipy.optimize import brentq

    def excess(log_sigma: float) -> float:
        sigma = math.exp(log_sigma)
        epsilon = gdp.compute_eps_poisson(steps=steps, noise_multiplier=sigma, sample_rate=sample_rate, delta=delta)
        return epsilon - target_epsilon

    try:
        return math.exp(brentq(excess, math.log(0.2), math.log(MAX_SIGMA), xtol=1e-3))
    except (ValueError, ArithmeticError):  # no sign change in the range, or an overflow at tiny σ
        return 1.0


def default_delta(n_patients: float) -> float:
    """δ well below 1/N: the largest power of ten ≤ 1/(10·N), capped at 1e-5."""
    if n_patients < 1:
        raise InvalidInput("need at least one training patient")
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * n_patients))))


def public_default_delta(patients_estimate: int, noise: float = COUNT_NOISE) -> float:
    """Default δ from the DP estimate ``N̂``: sized for ``N̂ + 4·noise`` so that δ < 1/(10 N) almost surely."""
    return default_delta(patients_estimate + 4.0 * noise)


def check_delta(delta: float, n_patients: int) -> str | None:
    """Refuse δ ≥ 1/N; return a warning for δ > 1/(10 N) (operator-side: uses the exact, private N)."""
    if not 0 < delta < 1.0 / n_patients:
        raise InvalidInput(
            f"delta must be in (0, 1/N_patients): {delta:g} is not below 1/{n_patients} — a mechanism with "
            "δ ≥ 1/N may publish one patient's data outright; choose a smaller --delta"
        )
    if delta > 0.1 / n_patients:
        return f"delta {delta:g} is above 1/(10·N_patients) = {0.1 / n_patients:.2g}; a smaller δ is recommended"
    return None


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP training run will do, solved before the first step from public numbers only."""

    target_epsilon: float
    delta: float
    accountant: str
    patients_estimate: int  # N̂, the store's DP patient count
    expected_batch_size: float  # q·N̂: the normaliser of the noised gradient sum
    sample_rate: float
    steps: int
    epochs: float
    noise_multiplier: float
    prior: tuple[Mechanism, ...] = field(default=())

    def history(self, steps: int | None = None) -> list[Mechanism]:
        """The whole privacy history of a model trained for ``steps`` (default: the planned steps)."""
        done = self.steps if steps is None else steps
        return [*self.prior, (self.noise_multiplier, self.sample_rate, done)]

    def as_dict(self) -> dict:
        return asdict(self)


def plan_privacy(
    *,
    target_epsilon: float,
    delta: float,
    patients_estimate: int,
    batch_size: int,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "prv",
    prior: Sequence[Mechanism] = (),
) -> PrivacyPlan:
    """Solve σ so that ``prior`` plus the planned DP-SGD steps spend exactly ``target_epsilon``.

    ``q = batch_size / patients_estimate``, which must stay below 1; ``steps = round(epochs / q)`` when epochs are
    given.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise InvalidInput(f"epsilon must be a positive number, got {target_epsilon}")
    if not 0 < delta < 1:
        raise InvalidInput(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise InvalidInput(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")
    if patients_estimate < 1 or batch_size < 1:
        raise InvalidInput("the patient estimate and the batch size must be positive")
    if batch_size >= patients_estimate:
        raise InvalidInput(
            f"a batch of {batch_size} expected patients is not below the cohort's ≈{patients_estimate} training "
            "patients (DP count): every step would take every patient (q = 1), giving up the privacy amplification "
            f"of sampling and spending ε far faster; choose --batch-size below {patients_estimate}, e.g. "
            f"{max(1, patients_estimate // 2)}"
        )
    sample_rate = batch_size / patients_estimate
    if steps is None:
        if epochs is None or epochs <= 0:
            raise InvalidInput("give a positive number of epochs or steps")
        steps = max(1, round(epochs / sample_rate))
    sigma = solve_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        prior=prior,
    )
    return PrivacyPlan(
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        patients_estimate=patients_estimate,
        expected_batch_size=sample_rate * patients_estimate,
        sample_rate=sample_rate,
        steps=steps,
        epochs=steps * sample_rate,
        noise_multiplier=sigma,
        prior=tuple(prior),
    )
