"""Privacy accounting for patient-level DP-SGD: pure functions over numbers, no training, no I/O.

The mechanism is the sampled Gaussian mechanism: each step Poisson-samples *patients* with rate
``q = expected batch / N_patients``, clips each sampled patient's gradient to ``C`` and adds
``N(0, (σC)²)`` noise. Opacus' accountants (PRV: Gopi et al. 2021; RDP: Mironov et al. 2019) turn
``(σ, q, steps)`` into ``(ε, δ)``. Sampling from the trained model is post-processing and costs nothing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from generators.errors import InvalidInput

ACCOUNTANTS = ("prv", "rdp")


def default_delta(n_patients: int) -> float:
    """δ well below 1/N: the largest power of ten ≤ 1/(10·N), capped at 1e-5."""
    if n_patients < 1:
        raise InvalidInput("need at least one training patient")
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * n_patients))))


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP training run will do, solved before the first step."""

    target_epsilon: float
    delta: float
    accountant: str
    n_patients: int
    expected_batch_size: int
    sample_rate: float
    steps: int
    epochs: float
    noise_multiplier: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan_privacy(
    *,
    target_epsilon: float,
    delta: float,
    n_patients: int,
    expected_batch_size: int,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "prv",
) -> PrivacyPlan:
    """Solve the noise multiplier σ that spends exactly ``target_epsilon`` over the planned steps."""
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise InvalidInput(f"epsilon must be a positive number, got {target_epsilon}")
    if not 0 < delta < 1.0 / n_patients:
        raise InvalidInput(f"delta must be in (0, 1/N_patients = {1.0 / n_patients:.2g}), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise InvalidInput(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")
    if not 1 <= expected_batch_size <= n_patients:
        raise InvalidInput(f"batch size must be between 1 and the {n_patients} training patients")
    sample_rate = expected_batch_size / n_patients
    if steps is None:
        if epochs is None or epochs <= 0:
            raise InvalidInput("give a positive number of epochs or steps")
        steps = max(1, round(epochs / sample_rate))
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" note is not actionable here
        warnings.simplefilter("ignore", UserWarning)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    return PrivacyPlan(
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        n_patients=n_patients,
        expected_batch_size=expected_batch_size,
        sample_rate=sample_rate,
        steps=steps,
        epochs=steps * sample_rate,
        noise_multiplier=sigma,
    )


def epsilon_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε after ``steps`` steps of the sampled Gaussian mechanism (0 before the first step)."""
    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))
