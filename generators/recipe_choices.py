"""The denoiser's named recipe choices (prediction target, timestep sampling, loss weighting, the network's
arithmetic precision), importable without torch so that presets and the CLI refuse an unknown choice before any
heavy import."""

from __future__ import annotations

from typing import Literal, get_args

Prediction = Literal["epsilon", "v_prediction", "sample"]
TimestepSampling = Literal["uniform", "logit-normal"]
LossWeighting = Literal["uniform", "min-snr"]
Precision = Literal["fp32", "bf16"]  # bf16: the network under bf16 autocast; losses, gradients and solvers stay fp32

PREDICTIONS: tuple[str, ...] = get_args(Prediction)
TIMESTEP_SAMPLING: tuple[str, ...] = get_args(TimestepSampling)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
PRECISIONS: tuple[str, ...] = get_args(Precision)
