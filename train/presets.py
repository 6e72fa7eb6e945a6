"""Training presets: model size, batch and schedule for a target machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from generators.errors import InvalidInput
from generators.recipe_choices import (
    LOSS_WEIGHTINGS,
    PRECISIONS,
    PREDICTIONS,
    TIMESTEP_SAMPLING,
    LossWeighting,
    Precision,
    Prediction,
    TimestepSampling,
)
from generators.unet import UNet3DSize, UNetSize
from train.trainable import TRAINABLE_SETS


@dataclass(frozen=True)
class Preset:
    """Everything about a training run except the privacy target and the data."""

    name: str
    image_size: int  # side of the model's images (slices) or of its isotropic volumes
    unet: UNetSize | UNet3DSize  # UNet3DSize exactly when generator is "diffusion-3d"
    batch_size: int  # expected logical batch (patients per step)
    physical_batch_size: int  # training items (slice or volume × draw) per forward/backward pass: speed and memory
    epochs: float
    learning_rate: float
    max_grad_norm: float
    noise_multiplicity: int
    ema_decay: float
    label_dropout: float = 0.1
    trainable: str = "all"  # parameter set DP-SGD trains after the public prior (train.trainable.TRAINABLE_SETS)
    lora_rank: int = 4  # rank of the adapters when trainable == "lora"
    slices_per_patient: int = 1  # m: slices of each sampled patient averaged before clipping (no ε cost)
    label_init: Literal["random", "null"] = "random"  # null: labels start at the null class's (prior's) embedding
    timestep_sampling: TimestepSampling = "uniform"  # of the DP draws (generators.diffusion)
    timestep_mean: float = 0.0  # logit-normal's focus: z ~ N(mean, 1); > 0 toward high noise, < 0 toward low
    prediction: Prediction = "sample"  # x0: smooth samples at small budgets
    loss_weighting: LossWeighting = "uniform"  # by noise level (generators.diffusion.loss_weights)
    flip: bool = False  # left-right flip of half of the training slices (label-preserving, no ε cost)
    checkpoint_every: int = 50
    public_prior: Literal["mni152", "none"] = "mni152"  # non-private pretraining on public data
    public_pretrain_steps: int = 400
    public_batch_size: int = 64
    public_learning_rate: float = 2e-3
    public_anomaly_rate: float = 0.0  # share of prior slices with generic focal anomalies (train.public_prior; 2-D)
    generator: Literal["diffusion-2d", "diffusion-3d"] = "diffusion-2d"  # slices or volumes
    # GPU path (train.per_patient_grads): every pass padded to patients_per_pass rows with a mask (one shape for
    # torch.compile / CUDA graphs, the same clipped sum), and bf16 autocast for the network (norms, clipping,
    # noise and optimizer in fp32)
    fixed_shape: bool = False
    precision: Precision = "fp32"
    compile: bool = False  # torch.compile the per-patient gradients for the fixed shape (2-D; compiles for minutes;
    # get_preset turns fixed_shape on with it)

    def __post_init__(self) -> None:
        """Refuse a preset no run could use (every construction, CLI overrides included), with the reason."""
        checks = [
            (
                self.prediction in PREDICTIONS,
                f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}",
            ),
            (
                self.public_prior in ("mni152", "none"),
                f"unknown public prior {self.public_prior!r}; choose 'mni152' or 'none'",
            ),
            (self.generator in ("diffusion-2d", "diffusion-3d"), f"unknown generator {self.generator!r}"),
            (
                self.precision in PRECISIONS,
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
            ),
            (isinstance(self.unet, UNet3DSize) == (self.generator == "diffusion-3d"), "unet size of the wrong kind"),
            (0.0 <= self.public_anomaly_rate <= 1.0, "public_anomaly_rate must lie in [0, 1]"),
            (
                not self.public_anomaly_rate or (self.spatial_dims == 2 and self.public_prior == "mni152"),
                "public_anomaly_rate applies to the 2-D mni152 public prior only",
            ),
            (self.noise_multiplicity >= 1, "--noise-multiplicity must be at least 1"),
            (self.slices_per_patient >= 1, "--slices-per-patient must be at least 1"),
            (
                self.label_init in ("random", "null"),
                f"unknown label init {self.label_init!r}; choose 'random' or 'null'",
            ),
            (
                self.timestep_sampling in TIMESTEP_SAMPLING,
                f"unknown timestep sampling {self.timestep_sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}",
            ),
            (
                not self.timestep_mean or self.timestep_sampling == "logit-normal",
                "--timestep-mean applies to logit-normal timestep sampling only",
            ),
            (
                -3.0 <= self.timestep_mean <= 3.0,
                "--timestep-mean must lie in [-3, 3] (beyond, almost every draw sits at one end)",
            ),
            (
                self.loss_weighting in LOSS_WEIGHTINGS,
                f"unknown loss weighting {self.loss_weighting!r}; choose one of {list(LOSS_WEIGHTINGS)}",
            ),
            (
                self.trainable in TRAINABLE_SETS,
                f"unknown trainable set {self.trainable!r}; choose one of {sorted(TRAINABLE_SETS)}",
            ),
            (
                not self.compile or (self.fixed_shape and self.spatial_dims == 2),
                "--compile needs fixed-shape passes (fixed_shape) and the 2-D network",
            ),
            (self.lora_rank >= 1, "--lora-rank must be at least 1"),
            (self.batch_size >= 1 and self.physical_batch_size >= 1, "batch sizes must be positive"),
            (self.epochs > 0, "--epochs must be positive"),
            (
                self.spatial_dims == 2 or self.trainable == "all",
                "the 3-D model trains every parameter (--trainable all)",
            ),
        ]
        for ok, reason in checks:
            if not ok:
                raise InvalidInput(reason)

    @property
    def patients_per_pass(self) -> int:
        """Patients per forward/backward pass: each brings m slices × K draws (at least one patient)."""
        return max(1, self.physical_batch_size // (self.slices_per_patient * self.noise_multiplicity))

    @property
    def spatial_dims(self) -> int:
        return 3 if self.generator == "diffusion-3d" else 2

    def as_dict(self) -> dict:
        return asdict(self)


# ≤ 15 min on 2 CPU cores for the 1 000-patient demo cohort at ε = 8.
_CPU_SMALL = Preset(
    name="cpu-small",
    image_size=32,
    unet=UNetSize(block_out_channels=(16, 32, 32), layers_per_block=1, attention_levels=(False, False, True)),
    batch_size=512,
    physical_batch_size=128,
    epochs=100,
    learning_rate=5e-4,
    max_grad_norm=1.0,
    noise_multiplicity=1,
    ema_decay=0.99,  # inert below ≈ 890 steps (warm-up); no EMA scored the same in 5 vs 4 runs (BENCHMARKS.md)
    timestep_sampling="logit-normal",  # ahead of uniform timesteps in 3 of 3 paired runs (BENCHMARKS.md)
    public_pretrain_steps=800,
)

PRESETS = {
    "cpu-small": _CPU_SMALL,
    # ≤ 45 min on 2 CPU cores: cpu-small with 4 slices of each sampled patient averaged before clipping
    # (no ε cost; its gain over cpu-small is within the run-to-run spread so far: BENCHMARKS.md).
    "cpu-quality": replace(_CPU_SMALL, name="cpu-quality", slices_per_patient=4),
    "cpu-medium": Preset(
        name="cpu-medium",
        image_size=64,
        unet=UNetSize(
            block_out_channels=(32, 64, 96, 128), layers_per_block=1, attention_levels=(False, False, False, True)
        ),
        batch_size=256,
        physical_batch_size=64,
        epochs=200,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        noise_multiplicity=2,
        ema_decay=0.995,
        public_pretrain_steps=1000,
    ),
    # ≤ 60 min on 2 CPU cores: whole volumes on a 32³ grid (≈ 7 mm on the demo data; ingest --dims 3 --size 32).
    "cpu-3d": Preset(
        name="cpu-3d",
        generator="diffusion-3d",
        image_size=32,
        unet=UNet3DSize(channels=(16, 32, 32), attention_levels=(False, False, True), num_head_channels=16),
        batch_size=128,
        physical_batch_size=16,
        epochs=8,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        noise_multiplicity=1,
        ema_decay=0.99,
        label_init="null",  # few DP steps: labels start from the public prior's (null-class) embedding
        checkpoint_every=10,
        public_pretrain_steps=600,
        public_batch_size=8,
    ),
    # one 24–80 GB GPU (sized, not measured here): 64³ volumes (≈ 3.4 mm on the demo data; --size 64).
    "gpu-3d": Preset(
        name="gpu-3d",
        generator="diffusion-3d",
        image_size=64,
        unet=UNet3DSize(
            channels=(32, 64, 128, 128),
            attention_levels=(False, False, False, True),
            num_res_blocks=2,
            num_head_channels=32,
        ),
        batch_size=256,
        physical_batch_size=32,
        epochs=100,
        learning_rate=5e-4,
        max_grad_norm=1.0,
        noise_multiplicity=2,
        ema_decay=0.999,
        label_init="null",
        checkpoint_every=100,
        public_pretrain_steps=3000,
        public_batch_size=8,
        fixed_shape=True,
        precision="bf16",
    ),
    "gpu": Preset(
        name="gpu",
        image_size=64,
        unet=UNetSize(
            block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_levels=(False, False, True, True)
        ),
        batch_size=512,  # q ≈ 0.63 on the demo cohort (≈ 810 training patients), 0.064 on 10 000 patients
        physical_batch_size=1024,
        epochs=500,
        learning_rate=5e-4,
        max_grad_norm=1.0,
        noise_multiplicity=4,
        ema_decay=0.999,
        checkpoint_every=200,
        public_pretrain_steps=3000,
        fixed_shape=True,
        precision="bf16",
    ),
}


def get_preset(name: str, **overrides: object) -> Preset:
    """A preset by name with non-``None`` overrides applied (CLI flags)."""
    if name not in PRESETS:
        raise InvalidInput(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    base = PRESETS[name]
    if "unet" in changes and isinstance(changes["unet"], dict):
        size_class = UNet3DSize if base.generator == "diffusion-3d" else UNetSize
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in changes["unet"].items()}
        changes["unet"] = size_class(**fields)
    if changes.get("compile") and "fixed_shape" not in changes:  # compiling needs one shape: padded passes (exact)
        changes["fixed_shape"] = True
    preset = replace(base, **changes)  # Preset.__post_init__ checks the result
    if "lora_rank" in changes and preset.trainable != "lora":
        raise InvalidInput("--lora-rank applies to --trainable lora only")
    return preset
