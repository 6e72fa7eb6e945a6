"""Model bundles and sampling.

A bundle is a directory::

    MODEL_DIR/config.json                          UNet2DModel arguments (diffusers ``save_pretrained``)
    MODEL_DIR/diffusion_pytorch_model.safetensors  weights (the EMA of the DP iterates)
    MODEL_DIR/scheduler/scheduler_config.json      the training noise schedule
    MODEL_DIR/model_card.json                      labels, geometry, the privacy guarantee, provenance

``model_card.json`` is written last: a directory without it is not a bundle.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from generators.errors import InvalidInput, NotFound
from generators.unet import null_class

CARD_FILE = "model_card.json"
CARD_FORMAT = 2  # 2: no exact private counts, a privacy history, the neighbouring relation, keyed randomness
MAX_SAMPLES_PER_CALL = 100_000
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0
SOLVERS = ("dpmsolver++", "unipc", "ddim")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def write_json_atomic(path: Path, data: Mapping) -> None:
    """Write JSON via a temp file + rename so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Generated:
    """Samples from :meth:`DiffusionModel.generate`.

    Attributes:
        images: ``[N, 1, H, W]`` float32 in [-1, 1] (CPU).
        labels: label name of each sample.
        seeds: the seed of each sample's initial noise; regenerating with it gives the same pixels.
    """

    images: torch.Tensor
    labels: list[str]
    seeds: np.ndarray


class DiffusionModel:
    """A class-conditional diffusion model with its card; samples with a fast solver."""

    def __init__(self, unet: UNet2DModel, scheduler_config: Mapping, card: Mapping, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.unet = unet.to(self.device).eval()
        self.scheduler_config = dict(scheduler_config)
        self.card = dict(card)
        self.label_ids: dict[str, int] = {str(k): int(v) for k, v in self.card["labels"].items()}
        self.image_size = int(self.card["image_size"])

    def __repr__(self) -> str:
        return f"DiffusionModel(labels={list(self.label_ids)}, size={self.image_size}, dp={self.card.get('dp')})"

    # ------------------------------------------------------------------------------------ persist
    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> DiffusionModel:
        model_dir = Path(model_dir)
        card_path = model_dir / CARD_FILE
        if not card_path.is_file():
            raise NotFound(f"no model bundle at {model_dir} (missing {CARD_FILE}; was training completed?)")
        try:
            card = json.loads(card_path.read_text())
            unet = UNet2DModel.from_pretrained(str(model_dir), low_cpu_mem_usage=False)
            scheduler_config = DDPMScheduler.load_config(str(model_dir / "scheduler"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"model bundle at {model_dir} is unreadable: {exc}") from None
        return cls(unet, scheduler_config, card, device)

    def save(self, model_dir: str | Path, card: Mapping | None = None) -> None:
        """Write weights, scheduler and (last) the card."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(model_dir), safe_serialization=True)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(str(model_dir / "scheduler"))
        if card is not None:
            self.card = dict(card)
        write_json_atomic(model_dir / CARD_FILE, self.card)

    # ----------------------------------------------------------------------------------- sampling
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
        if isinstance(labels, Mapping):
            names: list[str] = []
            for name, count in labels.items():
                if not isinstance(count, int | np.integer) or isinstance(count, bool) or count < 0:
                    raise InvalidInput(f"count for label {name!r} must be a non-negative integer, got {count!r}")
                names.extend([str(name)] * int(count))
        else:
            names = [str(n) for n in labels]
        unknown = sorted({n for n in names if n not in self.label_ids})
        if unknown:
            raise InvalidInput(f"unknown label(s) {unknown}; valid labels are {sorted(self.label_ids)}")
        if not names:
            raise InvalidInput("nothing to generate: ask for at least one sample")
        if len(names) > MAX_SAMPLES_PER_CALL:
            raise InvalidInput(f"{len(names)} samples requested; at most {MAX_SAMPLES_PER_CALL} per call")
        return names

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
        progress: Callable[[int], None] | None = None,
    ) -> Generated:
        """Sample images; sample ``i`` starts from noise seeded with ``seed + i`` (or ``seeds[i]``).

        Deterministic for the same request on the same device. Classifier-free guidance mixes the
        conditional and null-class predictions: ``uncond + guidance · (cond − uncond)``.
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
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        null = null_class(len(self.label_ids))
        size = self.image_size
        out = torch.empty(len(names), 1, size, size)

        for start in range(0, len(names), batch_size):
            # 2. initial noise, one generator per sample so each sample is reproducible from its seed
            batch_seeds = seeds_arr[start : start + batch_size]
            latents = torch.cat(
                [torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(int(s))) for s in batch_seeds]
            ).to(self.device)  # (B, 1, H, W)
            ids = torch.tensor([self.label_ids[n] for n in names[start : start + batch_size]], device=self.device)
            # 3. timesteps
            scheduler = self._sampler(solver)
            scheduler.set_timesteps(steps, device=self.device)
            latents = latents * scheduler.init_noise_sigma
            # 4. denoising loop
            for t in scheduler.timesteps:
                if guidance == 1.0:
                    prediction = self.unet(latents, t, class_labels=ids).sample
                else:
                    both = self.unet(
                        torch.cat([latents, latents]), t, class_labels=torch.cat([ids, torch.full_like(ids, null)])
                    ).sample  # (2B, 1, H, W)
                    cond, uncond = both.chunk(2)
                    prediction = uncond + guidance * (cond - uncond)
                latents = scheduler.step(prediction, t, latents).prev_sample
            out[start : start + len(batch_seeds)] = latents.clamp(-1.0, 1.0).float().cpu()
            if progress:
                progress(len(batch_seeds))
        return Generated(images=out, labels=names, seeds=seeds_arr)


def save_grid(images: torch.Tensor, path: Path, *, columns: int = 8, scale: int = 2) -> None:
    """Save ``[N, 1, H, W]`` images in [-1, 1] as one PNG grid (for looking at samples)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w), dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    Image.fromarray(grid).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)
