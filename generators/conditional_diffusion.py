"""What every class-conditional diffusion generator shares, whatever its network and dimension.

A subclass names its ``kind`` and ``dims``, owns its network (``self.network``), predicts with
:meth:`ConditionalDiffusion.predict` and persists the network's weights; sampling (seeded per sample,
classifier-free guidance, fast solvers), label checks, sampling options and membership losses live here once.
The noise schedule is the training scheduler's config, saved in ``MODEL_DIR/scheduler/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from generators.base import Generated, expand_labels, resolve_device
from generators.card import ModelCard, write_card
from generators.covariates import condition_ids, null_condition
from generators.demographics import COVARIATES
from generators.diffusion import autocast_for, compile_for, denoising_loss, noise_schedule
from generators.errors import InvalidInput
from generators.recipe_choices import PRECISIONS, Precision
from generators.unet import null_class

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0
SOLVERS = ("dpmsolver++", "unipc", "ddim")
SCHEDULER_DIR = "scheduler"


class ConditionalDiffusion:
    """A class-conditional diffusion model with its card; samples with a fast solver."""

    kind: ClassVar[str]
    dims: ClassVar[int]

    def __init__(
        self, network: torch.nn.Module, scheduler_config: Mapping, card: ModelCard, device: str = "auto"
    ) -> None:
        if card.generator != self.kind or card.spatial_dims != self.dims:
            raise InvalidInput(f"a {card.generator} card ({card.spatial_dims}-D) cannot load as {self.kind}")
        self.device = resolve_device(device)
        self.network = network.to(self.device).eval()
        # as saved to disk: diffusers drops "_use_default_values" on save, and keeping it in memory would let the
        # solver take its own defaults (e.g. timestep spacing), so a model would sample differently after loading
        self.scheduler_config = {k: v for k, v in scheduler_config.items() if k != "_use_default_values"}
        self.card = card
        self._label_ids = dict(card.labels)
        self._compiled: dict[str, Callable[..., torch.Tensor]] = {}  # backend → :meth:`denoiser`, on first use

    def __repr__(self) -> str:
        return f"{type(self).__name__}(labels={list(self.label_ids)}, shape={self.image_shape}, dp={self.card.dp})"

    @property
    def label_ids(self) -> dict[str, int]:
        return self._label_ids

    @property
    def spatial_dims(self) -> int:
        return self.dims

    @property
    def image_size(self) -> int:
        return self.card.image_size

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.card.image_shape

    def predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The network's prediction for noisy ``x`` at timestep(s) ``t``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ persist
    def save_network(self, model_dir: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def load_scheduler_config(model_dir: Path) -> dict:
        try:
            return dict(DDPMScheduler.load_config(str(model_dir / SCHEDULER_DIR)))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"model bundle {model_dir.name} has no readable noise schedule: {exc}") from None

    def save(self, model_dir: str | Path, card: ModelCard | None = None) -> None:
        """Write the network, the noise schedule and (last) the card."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.save_network(model_dir)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(str(model_dir / SCHEDULER_DIR))
        if card is not None:
            self.card, self._label_ids = card, dict(card.labels)
        write_card(model_dir, self.card)

    # ----------------------------------------------------------------------------------- sampling
    def denoiser(self, compile: bool | str = False) -> Callable[..., torch.Tensor]:
        """The network call of the sampling loop: :meth:`predict`, or it compiled for each batch's shape
        (:func:`generators.diffusion.compile_for`: CUDA graphs on a GPU; ``True``: torch's default compiler,
        inductor; a string: that ``torch.compile`` backend). A shape's first batch compiles (seconds on a GPU,
        about a minute on a CPU); :meth:`generate` copies each output out before the next call."""
        if compile is False:
            return self.predict
        backend = "inductor" if compile is True else compile
        if backend not in torch.compiler.list_backends(exclude_tags=()):
            raise InvalidInput(f"unknown torch.compile backend {backend!r}")
        if backend not in self._compiled:
            self._compiled[backend] = compile_for(self.predict, self.device, backend)
        return self._compiled[backend]

    def _sampler(self, solver: str):
        config = self.scheduler_config
        if solver == "dpmsolver++":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        if solver == "unipc":
            from diffusers import UniPCMultistepScheduler

            return UniPCMultistepScheduler.from_config(config)
        if solver == "ddim":
            return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
        raise InvalidInput(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")

    def resolve_labels(self, labels: Mapping[str, int] | Sequence[str]) -> list[str]:
        """Expand ``{"lesion": 3}`` or ``["lesion", ...]`` into one label per sample, checking names and counts."""
        return expand_labels(labels, self.label_ids)

    def condition_ids(self, names: Sequence[str], conditions: Sequence[Mapping[str, Any]] | None) -> torch.Tensor:
        """What the network is conditioned on for each sample: label ids, or (a covariate model) condition ids
        packing label, sex and age (:mod:`generators.covariates`); ``conditions`` are checked here."""
        ids = [self.label_ids[n] for n in names]
        if self.card.covariates is None:
            if conditions is not None and any(c for c in conditions):
                raise InvalidInput("this model was not trained on covariates (age, sex); ask by label only")
            return torch.tensor(ids, dtype=torch.long)
        if conditions is not None:
            if len(conditions) != len(names):
                raise InvalidInput("conditions must have one entry per sample")
            for condition in conditions:
                check_condition(condition, self.card.covariates)
        return condition_ids(ids, conditions, len(self.label_ids))

    def null_id(self) -> int:
        """The condition of the unconditional prediction (classifier-free guidance)."""
        n = len(self.label_ids)
        return null_condition(n) if self.card.covariates is not None else null_class(n)

    def sampling_options(self, **requested: Any) -> dict[str, Any]:
        """Solver steps and guidance: the card's sampler defaults, overridden by non-``None`` requests."""
        options = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "solver": "dpmsolver++"}
        options.update({k: v for k, v in self.card.sampler.items() if k in options})
        unknown = sorted(set(requested) - set(options))
        if unknown:
            raise InvalidInput(f"unknown sampling option(s) {unknown} for {self.kind}; choose from {sorted(options)}")
        options.update({k: v for k, v in requested.items() if v is not None})
        return options

    @torch.no_grad()
    def generate(
        self,
        *,
        labels: Mapping[str, int] | Sequence[str],
        seed: int,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        solver: str = "dpmsolver++",
        batch_size: int = 64,
        seeds: Sequence[int] | None = None,
        conditions: Sequence[Mapping[str, Any]] | None = None,
        progress: Callable[[int], None] | None = None,
        precision: Precision = "fp32",
        compile: bool | str = False,
    ) -> Generated:
        """Sample images; sample ``i`` starts from noise seeded with ``seed + i`` (or ``seeds[i]``).

        Deterministic for the same request on the same device. Classifier-free guidance mixes the
        conditional and null-class predictions: ``uncond + guidance · (cond − uncond)``. A covariate model
        also takes ``conditions``: per sample ``{"age": years, "sex": "F" | "M"}``, either may be left out.
        ``precision="bf16"`` runs the network under bf16 autocast; the guidance mix and the solver stay fp32.
        ``compile`` runs the network compiled (:meth:`denoiser`; CUDA graphs on a GPU): the same samples to float
        rounding, for a first batch of each shape that compiles.
        """
        # 1. check inputs
        names = self.resolve_labels(labels)
        if not 1 <= steps <= 1000:
            raise InvalidInput(f"steps must be between 1 and 1000, got {steps}")
        if not 0.0 <= guidance <= 20.0:
            raise InvalidInput(f"guidance must be between 0 and 20, got {guidance}")
        if seeds is None:
            seeds = [seed + i for i in range(len(names))]
        if len(seeds) != len(names):
            raise InvalidInput("seeds must have one entry per sample")
        if precision not in PRECISIONS:
            raise InvalidInput(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        all_ids = self.condition_ids(names, conditions)
        null = self.null_id()
        predict = self.denoiser(compile)
        shape = (1, *self.image_shape)
        out = torch.empty(len(names), *shape)

        for start in range(0, len(names), batch_size):
            # 2. initial noise, one generator per sample so each sample is reproducible from its seed
            batch_seeds = seeds_arr[start : start + batch_size]
            latents = torch.cat(
                [torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(s))) for s in batch_seeds]
            ).to(self.device)  # (B, 1, H, W) or (B, 1, D, H, W)
            ids = all_ids[start : start + batch_size].to(self.device)
            # 3. timesteps
            scheduler = self._sampler(solver)
            scheduler.set_timesteps(steps, device=self.device)
            latents = latents * scheduler.init_noise_sigma
            # 4. denoising loop
            for t in scheduler.timesteps:
                with autocast_for(self.device, precision):
                    if guidance == 1.0:
                        raw = predict(latents, t, ids)
                    else:  # conditional and null-condition predictions in one call: (2B, 1, ...)
                        raw = predict(torch.cat([latents, latents]), t, torch.cat([ids, torch.full_like(ids, null)]))
                # a compiled call's output is overwritten by the next call: copied out at once
                raw = raw.float() if compile is False else raw.float().clone()
                if guidance == 1.0:
                    prediction = raw
                else:
                    cond, uncond = raw.chunk(2)
                    prediction = uncond + guidance * (cond - uncond)
                latents = scheduler.step(prediction, t, latents).prev_sample
            out[start : start + len(batch_seeds)] = latents.clamp(-1.0, 1.0).float().cpu()
            if progress:
                progress(len(batch_seeds))
        return Generated(
            images=out,
            labels=names,
            seeds=seeds_arr,
            conditions=None if conditions is None else [dict(c) for c in conditions],
        )

    @torch.no_grad()
    def membership_losses(
        self, images: np.ndarray, labels: np.ndarray, *, timesteps: Sequence[int], seed: int, batch_size: int = 256
    ) -> np.ndarray:
        """Denoising loss of each image at each fixed timestep, ``[len(timesteps), N]``.

        The noise of image ``i`` at timestep ``t`` is seeded by ``(seed, t)`` and the image's position, so two
        calls on the same images measure the same draws. ``labels`` are label ids; a covariate model is asked
        with its covariates left open.
        """
        if len(images) != len(labels):
            raise InvalidInput("images and labels must have the same length")
        if self.card.covariates is not None:
            labels = condition_ids(np.asarray(labels).tolist(), None, len(self.label_ids)).numpy()
        alphas = noise_schedule(DDPMScheduler.from_config(self.scheduler_config)).to(self.device)
        if any(not 0 <= int(t) < len(alphas) for t in timesteps):
            raise InvalidInput(f"membership timesteps must lie in 0..{len(alphas) - 1}")
        prediction = self.scheduler_config.get("prediction_type", "epsilon")
        losses = np.empty((len(timesteps), len(images)), dtype=np.float64)
        for k, t in enumerate(timesteps):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + int(t))
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32)).to(self.device)
                noise = torch.randn(x.shape, generator=generator).to(self.device)  # (B, 1, ...)
                y = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long, device=self.device)
                steps = torch.full((len(x),), int(t), dtype=torch.long, device=self.device)
                per_image = denoising_loss(self.predict, x, y, steps, noise, alphas, prediction, per_draw=True)
                losses[k, start : start + len(x)] = per_image.double().cpu().numpy()
        return losses


def check_condition(condition: Mapping[str, Any], declared: Mapping[str, Any]) -> None:
    """A per-sample condition within what the model declares it was trained on."""
    unknown = sorted(set(condition) - set(COVARIATES))
    if unknown:
        raise InvalidInput(f"unknown covariate(s) {unknown}; supported: {list(COVARIATES)}")
    for name, value in condition.items():
        if value is None:
            continue
        if name not in declared:
            raise InvalidInput(f"this model was not trained on {name}; leave it out of the request")
        if name == "age":
            low, high = declared["age"]["min"], declared["age"]["max"]
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                raise InvalidInput(
                    f"age must be a whole number of years in {low}-{high} (the model's range), got {value!r}"
                )
        elif value not in declared["sex"]:
            raise InvalidInput(f"sex must be one of {declared['sex']}, got {value!r}")
