"""Patient-level DP-SGD training of the class-conditional diffusion model (Opacus), on slices (``diffusion-2d``)
or whole volumes (``diffusion-3d``): the preset names the generator kind and the store must hold matching items.

One step:
1. ``train.poisson`` Poisson-samples *patients* with rate ``q = B / N̂`` (``N̂`` the store's DP patient
   count; Opacus' sampling law, drawn on the run's device) and splits the logical batch into passes of at
   most ``patients_per_pass`` as Opacus' ``BatchSplittingSampler`` does (an empty batch still steps).
2. Each sampled patient contributes ``m`` uniformly chosen slices (volumes in 3-D; over all of the patient's
   scans, with replacement), each seen under ``K`` (timestep, noise) draws with label dropout (null class) for
   classifier-free guidance. Only the preset's trainable parameter set is trained (``train.trainable``).
3. Exact per-patient gradients (``train.per_patient_grads``) go into ``p.grad_sample``; Opacus'
   ``DPOptimizer`` clips each patient to ``C``, adds ``N(0, σ²C²)`` (``secure_mode``: robust to floating-point
   attacks) and averages over the expected batch; its step hook feeds the accountant.
4. An EMA of the weights is kept (post-processing of DP iterates: free).

Randomness: ``--seed`` fixes only what is public (initialisation, the public-prior phase, the sample grids).
Everything that touches private data — Poisson masks, slice choice, timesteps, noise draws, label dropout and
the DP noise — comes from generators seeded from OS entropy on every run, so it is unpredictable and not
reproducible. Their states live only in the private checkpoint (``MODEL_DIR/private/checkpoint.pt``, 0600),
so ``resume`` continues exactly; Ctrl-C finishes the current step and writes one.

Every DP run is recorded in the store's privacy ledger (``train.ledger``) before its first step, and refused
when it would take the store past its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import secrets
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

from generators.atomic import write_atomic, write_json_atomic
from generators.base import resolve_device, save_grid
from generators.card import CARD_FORMAT, ModelCard, card_exists, read_card
from generators.conditional_diffusion import ConditionalDiffusion
from generators.covariates import (
    AGE_NULL,
    SEX_NULL,
    ConditionEmbedding,
    age_id,
    attach_condition_embedding,
    encode,
    null_condition,
    sex_id,
)
from generators.diffusion import autocast_for, denoising_loss, draw_timesteps, noise_schedule, training_scheduler
from generators.diffusion_2d import DEFAULT_GUIDANCE, DEFAULT_STEPS, DiffusionModel
from generators.errors import Conflict, InvalidInput, PrivacyPolicy, PrivacyWarning
from generators.layout import BundleLayout
from generators.unet import UNet3DSize, build_unet, null_class, use_plain_attention
from train.accounting import RELATION, PrivacyPlan, check_delta, count_mechanism, epsilon_of, plan_privacy
from train.distributed import World, join_world, leave_world
from train.per_patient_grads import (
    compile_grad_fn,
    make_per_patient_grad_fn,
    masked_pass,
    padded_ids,
)
from train.poisson import PoissonPasses
from train.preprocess import resize_images, resize_split
from train.presets import Preset
from train.public_prior import DESCRIPTION as PUBLIC_PRIOR_DESCRIPTION
from train.public_prior import cosine_lr, pretrain, template_images
from train.store import CohortStore
from train.trainable import TRAINABLE_SETS, count_parameters, merged_weights, prepare_trainable

UNIT_MEANING = {
    "patient": "the PATIENT: any single patient's entire data (all of their slices and scans)",
    "image": "the IMAGE: the inputs did not say which images belong to one person, so a person with several "
    "images is protected only per image (k images: roughly k·ε)",
}
PRIVACY_STATEMENT = (
    "Differential privacy with {unit} changes the distribution of the released model by at most (epsilon, "
    "delta), under the add/remove neighbouring relation. The guarantee covers the model and anything generated "
    "from it (sampling is post-processing and spends no budget). Each training step Poisson-sampled units, used "
    "a fixed number of slices per sampled unit, clipped each unit's whole gradient and added Gaussian noise "
    "(DP-SGD); the cohort's size enters only through a differentially private count, included in epsilon. It "
    "does NOT cover the memorization filter or which samples were released (the filter reads private data), "
    "nor the held-out patients who calibrate that filter."
)
ORIENTATION = {
    2: "axial slice; rows anterior→posterior, columns patient left→right",
    3: "volume [D, H, W]: axial slices stacked inferior→superior; rows anterior→posterior, columns patient "
    "left→right (RAS+ in the NIfTI output)",
}
NOT_PRIVATE_STATEMENT = "NOT PRIVATE: this model was trained without differential privacy."
RANDOMNESS = {
    "seeded_by_public_seed": ["initialisation", "public-prior pretraining", "sample grids"],
    "from_os_entropy": [
        "Poisson sampling of patients",
        "slice choice",
        "timesteps and noise of the loss",
        "label dropout",
        "DP noise (Opacus secure_mode)",
    ],
    "statement": "The randomness that touches private data is drawn from OS entropy on every run and is not "
    "reproducible; no seed of it is recorded anywhere public.",
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, privacy target, preset and run control."""

    store: Path
    out: Path
    preset: Preset
    epsilon: float | None = 8.0
    delta: float | None = None
    accountant: str = "prv"
    dp: bool = True
    max_steps: int | None = None
    seed: int = 0  # public randomness only
    device: str = "auto"
    resume: bool = False
    force: bool = False
    allow_over_budget: bool = False
    samples_per_label: int = 16
    prior_cache: Path | None = None  # directory of public-prior weights to reuse (public inputs only)
    covariates: dict | None = None  # declared covariates to condition on (generators.demographics.validate_declared)
    extra: dict = field(default_factory=dict)

    def inputs_digest(self, store_id: str) -> str:
        """Hash of every choice that determines the run (for "reuse if unchanged"); no private data in it."""
        payload = {
            "store": store_id,
            "preset": self.preset.as_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "dp": self.dp,
            "max_steps": self.max_steps,
            "seed": self.seed,
            **({"covariates": self.covariates} if self.covariates else {}),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TrainProgress:
    """What a progress callback gets after every step: of the public prior (non-private pretraining), then of
    DP training (``patients``: the exact sampled count, for the operator's terminal only; ``epsilon``: spent so
    far, every 10 steps and at the last)."""

    phase: Literal["public prior", "dp"]
    step: int
    total: int
    loss: float
    patients: int | None = None
    epsilon: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """A finished (or reused) bundle's card; or, for a run stopped by Ctrl-C, where its checkpoint resumes."""

    card: ModelCard | None  # None only for an interrupted run
    reused: bool = False
    stopped_at: int | None = None  # the last finished step of an interrupted run (its checkpoint's)
    total_steps: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.stopped_at is not None


class PatientSlices:
    """Which store rows belong to each training patient, and uniform picks of slices per patient. Label, age
    (years, -1 unknown) and sex (``F``/``M``/``U``) are per patient: those of the patient's first row."""

    def __init__(
        self, patients: np.ndarray, labels: np.ndarray, ages: np.ndarray | None = None, sexes: np.ndarray | None = None
    ) -> None:
        keys, inverse = np.unique(patients, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(keys))
        first = order[np.concatenate([[0], np.cumsum(counts)[:-1]])]
        self.rows = torch.from_numpy(order)
        self.starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.counts = torch.from_numpy(counts)
        self.labels = torch.from_numpy(labels[first].astype(np.int64))
        unknown = np.full(len(patients), -1)
        self.age_ids = torch.tensor([age_id(int(a)) for a in (unknown if ages is None else ages)[first]])
        self.sex_ids = torch.tensor([sex_id(str(x)) for x in (unknown if sexes is None else sexes)[first]])
        self.n_patients = len(keys)

    def to(self, device: torch.device | str) -> PatientSlices:
        """The same index with its tensors on ``device`` (picks then happen there, from a generator there)."""
        for name in ("rows", "starts", "counts", "labels", "age_ids", "sex_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def pick(self, patient_ids: torch.Tensor, generator: torch.Generator, m: int = 1) -> torch.Tensor:
        """``m`` uniformly random slice rows per patient id (over all of the patient's scans, with replacement):
        shape ``(len(patient_ids),)`` for ``m = 1``, else ``(len(patient_ids), m)``."""
        ids = patient_ids.view(-1, 1).expand(-1, m)
        offsets = (torch.rand(ids.shape, generator=generator, device=generator.device) * self.counts[ids]).long()
        rows = self.rows[self.starts[ids] + offsets]
        return rows[:, 0] if m == 1 else rows


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy (never from a seed anyone else could know)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _library_versions() -> dict[str, str]:
    import diffusers
    import opacus

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "opacus": opacus.__version__,
        "numpy": np.__version__,
    }


def _save_atomic(obj: object, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))  # 0600


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class TrainingRun:
    """Everything one run needs, decided before the first step."""

    config: TrainConfig
    store: CohortStore
    out: Path
    digest: str
    device: torch.device
    world: World  # this process among the training processes (train.distributed)
    slices: PatientSlices  # on the run's device
    train_images: np.ndarray | torch.Tensor  # resident at the model's size when they fit (resident_images)
    n_classes: int
    plan: PrivacyPlan | None
    sample_rate: float
    planned_steps: int
    total_steps: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # its ledger release (a resume keeps its own)

    @property
    def checkpoint_path(self) -> Path:
        return BundleLayout(self.out).checkpoint


@dataclass
class TrainingState:
    """What a checkpoint holds: weights, EMA, optimiser, accountant, the private generators, progress."""

    run_id: str
    model: torch.nn.Module
    ema: dict[str, torch.Tensor]
    base_optimizer: torch.optim.Optimizer
    accountant: Any
    sampler_gen: torch.Generator
    draw_gen: torch.Generator
    noise_gen: torch.Generator
    step: int = 0
    elapsed: float = 0.0
    pretrain_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def save(self, run: TrainingRun) -> None:
        _save_atomic(
            {
                "inputs_digest": run.digest,
                "run_id": self.run_id,
                "step": self.step,
                "elapsed": self.elapsed,
                "pretrain_seconds": self.pretrain_seconds,
                "losses": self.losses,
                "model": self.model.state_dict(),
                "ema": self.ema,
                "optimizer": self.base_optimizer.state_dict(),
                "accountant": self.accountant.state_dict() if self.accountant is not None else None,
                "sampler_gen": self.sampler_gen.get_state(),
                "draw_gen": self.draw_gen.get_state(),
                "noise_gen": self.noise_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            run.checkpoint_path,
        )

    def restore(self, run: TrainingRun) -> None:
        saved = torch.load(run.checkpoint_path, map_location=run.device, weights_only=False)
        if saved["inputs_digest"] != run.digest:
            raise InvalidInput("the checkpoint was made with other inputs (store, preset or privacy settings)")
        self.model.load_state_dict(saved["model"])
        self.ema = saved["ema"]
        self.base_optimizer.load_state_dict(saved["optimizer"])
        if self.accountant is not None:
            self.accountant.load_state_dict(saved["accountant"])
        for name in ("sampler_gen", "draw_gen", "noise_gen"):  # a generator's state is a CPU byte tensor
            getattr(self, name).set_state(saved[name].cpu())
        torch.set_rng_state(saved["torch_rng"])
        self.run_id, self.step, self.elapsed = saved["run_id"], saved["step"], saved["elapsed"]
        self.losses, self.pretrain_seconds = saved["losses"], saved["pretrain_seconds"]


def train_model(
    config: TrainConfig,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    on_plan: Callable[[PrivacyPlan | None, int], None] | None = None,
) -> TrainResult:
    """Train (or resume, or reuse) a model bundle at ``config.out``; returns its public card.

    ``progress`` receives a :class:`TrainProgress` after every step. A first Ctrl-C (SIGINT) stops after the
    current step with a checkpoint.
    """
    stop = _StopFlag()
    world = join_world(config.device)  # one process, or one rank of a torchrun launch
    try:
        with stop.installed():
            return _train(config, world, stop, progress, on_plan)
    finally:
        leave_world(world)


def _train(
    config: TrainConfig,
    world: World,
    stop: _StopFlag,
    progress: Callable[[TrainProgress], None] | None,
    on_plan: Callable[[PrivacyPlan | None, int], None] | None,
) -> TrainResult:
    # 1. inputs: the store, the output directory (or a bundle to reuse), the privacy plan
    if config.dp and (config.epsilon is None or config.epsilon <= 0):
        raise InvalidInput("--epsilon must be positive for DP training")
    store = CohortStore.open(config.store)
    reused = _reusable_card(config, store)
    if reused is not None:
        return TrainResult(card=reused, reused=True)
    run = plan_run(config, store, world)
    _check_output(config)
    world.barrier()  # every rank has looked at the output before rank 0 writes to it (else a slow rank finds it full)
    if world.is_main:  # rank 0 alone writes: ledger, output directory, checkpoints, bundle
        if not config.resume:  # a resumed run was admitted (and recorded) when it started
            _reserve_budget(run)
        _prepare_output(config)
    world.barrier()
    if on_plan and world.is_main:
        on_plan(run.plan, run.total_steps)

    # 2. model, public prior, optimiser, DP machinery and the private generators (or the checkpoint)
    state = initial_state(run, progress)
    if config.resume:
        state.restore(run)
        if world.distributed:  # ranks and their patients may differ from the checkpoint's: fresh OS entropy
            state.sampler_gen, state.draw_gen = private_generator(run.device), private_generator(run.device)
            state.noise_gen = private_generator(run.device)
    else:
        torch.manual_seed(secrets.randbits(63))  # no later draw may follow from the public seed

    # 3. the DP-SGD loop
    interrupted = _run_steps(run, state, stop, progress)
    if interrupted:
        return TrainResult(card=None, stopped_at=state.step, total_steps=run.total_steps)

    # 4. the bundle: EMA weights, public card (written last), private record, sample grids
    card = _write_bundle(run, state) if world.is_main else None
    world.barrier()
    return TrainResult(card=card if card is not None else read_card(config.out))


def _reusable_card(config: TrainConfig, store: CohortStore) -> ModelCard | None:
    """The card of a bundle at ``out`` trained on the same inputs (reuse it: no ε spent again), else ``None``."""
    if not card_exists(config.out) or config.resume:
        return None
    card = read_card(config.out)
    if card.training_inputs_digest == config.inputs_digest(store.store_id) and not config.force:
        return card
    if not config.force:
        raise Conflict(f"{config.out} already holds a model trained on other inputs; use a new --out or --force")
    return None


def _check_output(config: TrainConfig) -> None:
    """Refuse an output this run cannot use, before anything is reserved or written."""
    out, layout = Path(config.out), BundleLayout(config.out)
    if config.resume and not layout.checkpoint.is_file():
        raise InvalidInput(f"nothing to resume: no checkpoint at {layout.checkpoint}")
    if out.exists() and not config.resume and not config.force and any(out.iterdir()):
        raise Conflict(f"{out} exists and is not empty; use a new --out, --resume or --force")


def _prepare_output(config: TrainConfig) -> None:
    """Make ``out`` ready for a (resumed) run; a bundle is incomplete until its card is written again."""
    layout = BundleLayout(config.out)
    layout.make_private()
    if not config.resume:
        layout.card.unlink(missing_ok=True)


def plan_run(config: TrainConfig, store: CohortStore, world: World | None = None) -> TrainingRun:
    """Solve the privacy plan from public numbers (N̂, B, epochs); check δ against the exact count."""
    preset = config.preset
    if store.spatial_dims != preset.spatial_dims:
        have = "volumes" if store.spatial_dims == 3 else "axial slices"
        want = "3-D preset (cpu-3d, gpu-3d) for it" if store.spatial_dims == 3 else "store ingested with --dims 3"
        raise InvalidInput(f"preset {preset.name} trains {preset.generator} but the store holds {have}; use a {want}")
    train_split = store.read("train")
    slices = PatientSlices(train_split.patients, train_split.labels, train_split.ages, train_split.sexes)
    n_patients = slices.n_patients  # exact and private: used only for operator-side checks
    if n_patients < 2:
        raise InvalidInput("need at least 2 training patients")
    world = world or World()
    if world.distributed and not config.dp:
        raise InvalidInput("--no-dp trains in one process: drop --nproc-per-node")
    if world.size > n_patients:
        raise InvalidInput("more training processes than training patients: use fewer (--nproc-per-node)")
    plan: PrivacyPlan | None = None
    if config.dp:
        delta = config.delta if config.delta is not None else float(store.meta["budget"]["delta"])
        warning = check_delta(delta, n_patients)
        if warning:
            warnings.warn(warning, PrivacyWarning, stacklevel=3)
        plan = plan_privacy(
            target_epsilon=float(config.epsilon),  # type: ignore[arg-type]
            delta=delta,
            patients_estimate=store.patients_estimate,
            batch_size=preset.batch_size,
            epochs=preset.epochs,
            accountant=config.accountant,
            prior=[count_mechanism(float(store.meta["patients_estimate"]["noise_std"]))],
        )
        planned_steps, sample_rate = plan.steps, plan.sample_rate
    else:
        sample_rate = min(1.0, preset.batch_size / n_patients)
        planned_steps = max(1, round(preset.epochs / sample_rate))
    device = world.device(resolve_device(config.device))
    if preset.compile and preset.precision == "bf16" and device.type == "cpu":  # refused before the ledger
        raise InvalidInput(
            "--compile with bf16 fails in torch's C++ code generation on a CPU; train bf16 presets on a CPU "
            "without --compile (it is for the GPU; on a CPU it gains little)"
        )
    return TrainingRun(
        config=config,
        store=store,
        out=Path(config.out),
        digest=config.inputs_digest(store.store_id),
        device=device,
        world=world,
        slices=slices.to(device),
        train_images=resident_images(train_split.images, preset.image_size, device),
        n_classes=len(store.label_names),
        plan=plan,
        sample_rate=sample_rate,
        planned_steps=planned_steps,
        total_steps=min(planned_steps, config.max_steps) if config.max_steps else planned_steps,
    )


def resident_images(images: np.ndarray, size: int, device: torch.device) -> np.ndarray | torch.Tensor:
    """The training images at the model's size, copied once to ``device`` when they fit (a quarter of a GPU's
    free memory, 4 GiB of host memory on a CPU); otherwise the store's memory map, read and resized per pass."""
    nbytes = len(images) * size ** (images.ndim - 2) * 4
    limit = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 4 << 30
    if nbytes > limit:
        return images
    resized = resize_split(images, size)  # a new array, or the (read-only) memory map itself when already at size
    return torch.from_numpy(np.array(resized, dtype=np.float32) if resized is images else resized).to(device)


def initial_state(run: TrainingRun, progress: Callable[[TrainProgress], None] | None) -> TrainingState:
    """A fresh model from the public seed, pretrained on public data; the DP optimiser; OS-entropy generators."""
    config, preset, device = run.config, run.config.preset, run.device
    torch.manual_seed(config.seed)
    model = build_network(preset, run.n_classes, config.covariates).to(device)
    pretrain_seconds = _public_prior(run, model, progress) if run.world.is_main else 0.0
    if preset.label_init == "null" and not config.resume:
        start_labels_at_null(model, null_class(run.n_classes))
    # the prior trained everything; DP-SGD trains this set (LoRA adapters are added here, at zero)
    trainable = prepare_trainable(model, preset.trainable, preset.lora_rank)
    run.world.broadcast_module(model)  # every rank starts from rank 0's (public) weights
    base_optimizer = torch.optim.Adam(trainable.values(), lr=preset.learning_rate)
    accountant = create_accountant(mechanism=config.accountant) if config.dp else None
    state = TrainingState(
        run_id=run.run_id,
        model=model,
        ema={name: p.detach().clone() for name, p in model.named_parameters()},
        base_optimizer=base_optimizer,
        accountant=accountant,
        sampler_gen=private_generator(device),  # Poisson masks, slice picks, timesteps and noise: where the data is
        draw_gen=private_generator(device),
        noise_gen=private_generator(device),
        pretrain_seconds=pretrain_seconds,
    )
    return state


def build_network(preset: Preset, n_classes: int, covariates: dict | None = None) -> torch.nn.Module:
    """A fresh denoiser of the preset's generator kind (initialised from torch's current seed), conditioned on
    label and, with ``covariates``, on age and sex (:mod:`generators.covariates`)."""
    if preset.spatial_dims == 3:
        from generators.diffusion_3d import build_unet_3d

        model = build_unet_3d(n_classes=n_classes, size=preset.unet)  # type: ignore[arg-type]
    else:
        model = build_unet(image_size=preset.image_size, n_classes=n_classes, size=preset.unet)  # type: ignore[arg-type]
        use_plain_attention(model)
    return attach_condition_embedding(model, n_classes) if covariates else model


def wrap_generator(preset: Preset, network: torch.nn.Module, card: ModelCard, device: str) -> ConditionalDiffusion:
    """The trained network as the generator its card names (what ``save`` writes and ``load`` reads back)."""
    scheduler_config = training_scheduler(preset.prediction).config
    if preset.spatial_dims == 3:
        from generators.diffusion_3d import Diffusion3DModel

        return Diffusion3DModel(network, preset.unet, scheduler_config, card, device=device)  # type: ignore[arg-type]
    return DiffusionModel(network, scheduler_config, card, device=device)


def start_labels_at_null(model: torch.nn.Module, null: int) -> None:
    """Give every label the null class's embedding (public: the prior trained only the null class), so DP
    training starts from a model whose conditional samples are the prior's and learns only what labels add."""
    if isinstance(model.class_embedding, ConditionEmbedding):
        model.class_embedding.start_at_null()
        return
    with torch.no_grad():
        embedding = model.class_embedding
        assert isinstance(embedding, torch.nn.Embedding), "a label-conditioned network has a class table"
        embedding.weight.copy_(embedding.weight[null].expand_as(embedding.weight))


def _public_prior(run: TrainingRun, model: torch.nn.Module, progress: Callable[[TrainProgress], None] | None) -> float:
    """Pretrain ``model`` on the public prior in place (or load the same prior from the cache); seconds spent."""
    config, preset, device = run.config, run.config.preset, run.device
    if preset.public_prior != "mni152" or preset.public_pretrain_steps <= 0 or config.resume:
        return 0.0
    started = time.perf_counter()
    cached = prior_cache_path(config, run.n_classes)
    if cached is not None and cached.is_file():
        model.load_state_dict(torch.load(cached, map_location=device, weights_only=True))
        return time.perf_counter() - started

    def report(i: int, loss: float) -> None:
        if progress:
            progress(TrainProgress("public prior", step=i, total=preset.public_pretrain_steps, loss=loss))

    pretrain(
        model,
        images=template_images(preset.image_size, preset.spatial_dims),
        steps=preset.public_pretrain_steps,
        batch_size=preset.public_batch_size,
        learning_rate=preset.public_learning_rate,
        alphas_cumprod=noise_schedule(training_scheduler(preset.prediction)).to(device),
        prediction=preset.prediction,
        null_label=_null_id(run),
        seed=config.seed + 4,
        device=device,
        anomaly_rate=preset.public_anomaly_rate,
        progress=report,
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(model.state_dict(), cached)
    return time.perf_counter() - started


def prior_cache_path(config: TrainConfig, n_classes: int) -> Path | None:
    """Where the public prior for these public inputs is cached (``None``: no cache). The key covers every
    input of ``pretrain`` — architecture, prior schedule, public seed, library versions — and no private data."""
    if config.prior_cache is None:
        return None
    p = config.preset
    key = {
        "generator": p.generator,
        "image_size": p.image_size,
        "unet": asdict(p.unet),
        "prediction": p.prediction,
        "prior": [p.public_prior, p.public_pretrain_steps, p.public_batch_size, p.public_learning_rate],
        **({"anomaly_rate": p.public_anomaly_rate} if p.public_anomaly_rate else {}),  # old caches keep their keys
        "n_classes": n_classes,
        "seed": config.seed,
        "versions": _library_versions(),
        **({"covariates": sorted(config.covariates)} if config.covariates else {}),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(config.prior_cache) / f"prior-{digest}.pt"


def make_dp_optimizer(
    base_optimizer: torch.optim.Optimizer,
    plan: PrivacyPlan,
    *,
    max_grad_norm: float,
    generator: torch.Generator,
    world: World | None = None,
) -> DPOptimizer:
    """Opacus' DP optimiser as training uses it: clip per patient to ``C``, add 𝒩(0, (σC)²) drawn by
    ``generator`` (secure mode), divide by the public expected batch ``q·N̂``. Across ``W`` ranks: each divides
    by ``q·N̂ / W``, rank 0 alone adds the noise, and the all-reduce averages (train.distributed)."""
    world = world or World()
    kind = DistributedDPOptimizer if world.distributed else DPOptimizer
    return kind(
        base_optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=plan.expected_batch_size / world.size,  # public: never the exact count
        loss_reduction="mean",
        generator=generator,
        secure_mode=True,
    )


def _make_optimizer(run: TrainingRun, state: TrainingState) -> torch.optim.Optimizer:
    if run.plan is None:
        return state.base_optimizer
    optimizer = make_dp_optimizer(
        state.base_optimizer,
        run.plan,
        max_grad_norm=run.config.preset.max_grad_norm,
        generator=state.noise_gen,
        world=run.world,
    )
    optimizer.attach_step_hook(state.accountant.get_optimizer_hook_fn(sample_rate=run.sample_rate))
    return optimizer


def _planned_release(run: TrainingRun) -> list[tuple[float, float, int]]:
    assert run.plan is not None
    return [(run.plan.noise_multiplier, run.sample_rate, run.total_steps)]


def _reserve_budget(run: TrainingRun) -> None:
    """Check the store's budget and reserve the planned steps in its ledger under one lock, before anything else
    is written (the run's final entry replaces the reservation). Refuses a run the budget cannot take."""
    ledger = run.store.ledger()
    if run.plan is None:  # --no-dp needs its own explicit consent; the ledger then records ε = ∞ for the store
        ledger.record(run.run_id, [], status="not-private", not_private=True, model=run.out.name)
        return
    ledger.reserve(
        run.run_id,
        _planned_release(run),
        accountant=run.config.accountant,
        allow_over_budget=run.config.allow_over_budget,
        status="reserved",
        model=run.out.name,
    )


def _run_steps(
    run: TrainingRun, state: TrainingState, stop: _StopFlag, progress: Callable[[TrainProgress], None] | None
) -> bool:
    """Train until ``run.total_steps``; returns ``True`` when stopped by Ctrl-C (checkpoint written)."""
    config, preset, device = run.config, run.config.preset, run.device
    optimizer = _make_optimizer(run, state)
    alphas = noise_schedule(training_scheduler(preset.prediction)).to(device)
    grad_fn = make_per_patient_grad_fn(
        state.model, alphas, preset.prediction, preset.loss_weighting, precision=preset.precision
    )
    if preset.compile:  # one shape for every pass (fixed_shape), so one compilation
        grad_fn = compile_grad_fn(grad_fn, state.model)
    params = {name: p for name, p in state.model.named_parameters() if p.requires_grad}
    m, k = preset.slices_per_patient, preset.slices_per_patient * preset.noise_multiplicity
    owned = run.world.owned(run.slices.n_patients)  # this rank's patients (all of them in one process)
    steps = PoissonPasses(  # drawn on the device from the private sampler generator
        owned,
        run.sample_rate,
        state.sampler_gen,
        steps=max(run.total_steps - state.step, 0),
        per_pass=preset.patients_per_pass if config.dp else None,
    )

    def draws(patient_ids: torch.Tensor) -> list[torch.Tensor]:  # all from the private draw generator, on device
        return list(draw_terms(run, patient_ids, state.draw_gen, m=m, k=k, n_timesteps=len(alphas)))

    state.model.train()
    start_time = time.perf_counter() - state.elapsed
    for passes in steps:
        for group in state.base_optimizer.param_groups:  # a schedule of the step number only: no data, no ε
            group["lr"] = cosine_lr(preset.learning_rate, state.step, run.total_steps)
        if config.dp:
            step_loss = dp_step(preset, grad_fn, params, passes, draws, optimizer, device)
        else:
            step_loss = _plain_step(state.model, preset, passes[0], draws, alphas, optimizer, device)
        state.elapsed = time.perf_counter() - start_time
        if _finish_step(run, state, params, step_loss, sum(len(ids) for ids in passes), stop, progress):
            return True
    return False


def _finish_step(
    run: TrainingRun,
    state: TrainingState,
    params: dict[str, torch.nn.Parameter],
    losses: torch.Tensor,
    patients: int,
    stop: _StopFlag,
    progress: Callable[[TrainProgress], None] | None,
) -> bool:
    """After a logical step: EMA, the step's mean loss (over every rank; its one read from the device),
    progress, checkpoints (rank 0). Returns ``True`` when the run stops here (Ctrl-C on any rank; checkpoint
    written)."""
    state.step += 1
    _update_ema(state, params, run.config.preset.ema_decay)
    loss_sum, count, patients_total = run.world.sum([float(losses.sum()), float(len(losses)), float(patients)])
    state.losses.append(loss_sum / count if count else float("nan"))
    if progress and run.world.is_main:
        progress(_step_info(run, state, int(patients_total)))
    stopping = run.world.any(stop.requested)
    if run.world.is_main and (
        stopping or state.step % run.config.preset.checkpoint_every == 0 or state.step == run.total_steps
    ):
        state.save(run)
    return stopping


def dp_step(
    preset: Preset,
    grad_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    passes: list[torch.Tensor],
    draws: Callable[[torch.Tensor], list[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> torch.Tensor:
    """One DP step over its passes: Opacus clips and accumulates each pass and noises and steps after the last
    (``signal_skip_step``, as its ``BatchSplittingSampler`` does). Returns the sampled patients' losses."""
    losses = []
    for i, ids in enumerate(passes):
        optimizer.signal_skip_step(do_skip=i < len(passes) - 1)  # type: ignore[attr-defined]
        losses.append(_dp_pass(preset, grad_fn, params, ids, draws, device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat(losses)


def _dp_pass(
    preset: Preset,
    grad_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    ids: torch.Tensor,
    draws: Callable[[torch.Tensor], list[torch.Tensor]],
    device: torch.device,
) -> torch.Tensor:
    """One pass of a DP step: the sampled patients' per-patient gradients go to Opacus (``grad_sample``, which
    it clips, sums and noises); returns their losses. An empty Poisson batch is still a (pure-noise) step."""
    detached = {n: p.detach() for n, p in params.items()}
    if preset.fixed_shape:  # every pass padded to one shape; the padded rows add exactly nothing
        rows, real = padded_ids(ids, preset.patients_per_pass)
        grads, losses = masked_pass(grad_fn, detached, tuple(draws(rows)), real)
        losses = losses[: len(ids)]
    elif len(ids) == 0:
        grads = {n: torch.zeros(0, *p.shape, device=device) for n, p in params.items()}
        losses = torch.zeros(0, device=device)
    else:
        grads, losses = grad_fn(detached, *draws(ids))
    for name, p in params.items():
        p.grad_sample = grads[name]  # type: ignore[attr-defined]
    return losses.detach()


def _plain_step(
    model: torch.nn.Module,
    preset: Preset,
    ids: torch.Tensor,
    draws: Callable[[torch.Tensor], list[torch.Tensor]],
    alphas: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> torch.Tensor:
    """One non-private step (``--no-dp`` benchmarks) on the whole Poisson batch: its mean loss ``(1,)``, or
    nothing for an empty batch (no update)."""
    if len(ids) == 0:
        return torch.zeros(0, device=device)
    images, labels, timesteps, noise = draws(ids)
    with autocast_for(device, preset.precision):
        loss = denoising_loss(
            model,
            images.flatten(0, 1),
            labels.flatten(),
            timesteps.flatten(),
            noise.flatten(0, 1),
            alphas,
            preset.prediction,
            weighting=preset.loss_weighting,
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float().reshape(1)


def draw_terms(
    run: TrainingRun, patient_ids: torch.Tensor, gen: torch.Generator, *, m: int, k: int, n_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss terms of the sampled patients, all drawn from ``gen`` (a private generator): ``m`` of each
    patient's slices (or volumes), each under ``k // m`` (timestep, noise) draws. Returns tensors on ``gen``'s
    device (where the run's data lives, ``patient_ids`` too): images
    ``(b, k, *item)``, labels ``(b, k)``, timesteps ``(b, k)`` and noise shaped like the images."""
    b, size, device = len(patient_ids), run.config.preset.image_size, gen.device
    item = (1, *(size,) * run.config.preset.spatial_dims)  # one slice [1, H, W] or volume [1, D, H, W]
    rows = run.slices.pick(patient_ids, gen, m).reshape(-1)  # (b·m,)
    if isinstance(run.train_images, torch.Tensor):  # resident on the device, already at the model's size
        images = run.train_images[rows]  # (b·m, *item), a copy
    else:
        images = resize_images(run.train_images[rows.cpu().numpy()], size).to(device)
    preset = run.config.preset
    if preset.flip:  # left-right (the last axis: patient left → right), half of the items, from the private draw
        flipped = torch.rand(len(images), generator=gen, device=device) < 0.5
        images[flipped] = images[flipped].flip(-1)
    labels = _conditions(run, patient_ids, k, gen)
    timesteps = draw_timesteps((b, k), n_timesteps, gen, preset.timestep_sampling, preset.timestep_mean)
    noise = torch.randn(b, k, *item, generator=gen, device=device)
    # each of a patient's m slices (or volumes) under K draws: (b, m·K, *item)
    images = images.view(b, m, 1, *item).expand(b, m, k // m, *item).reshape(b, k, *item)
    return images, labels, timesteps, noise


def _timestep_words(preset: Preset) -> str:
    """How the DP draws' timesteps were sampled, for the model card."""
    if preset.timestep_mean:
        return f"{preset.timestep_sampling} timesteps, focus z ~ N({preset.timestep_mean:g}, 1)"
    return f"{preset.timestep_sampling} timesteps"


PREDICTION_WORDS = {"sample": "the clean image x0", "epsilon": "the added noise ε", "v_prediction": "v = αε − σx0"}
WEIGHTING_WORDS = {"uniform": "uniform over noise levels", "min-snr": "min-SNR-5 (Hang et al. 2023)"}


def denoiser_summary(preset: Preset) -> dict[str, Any]:
    """The recipe choices that matter for utility, as the card states them."""
    size = preset.unet
    if isinstance(size, UNet3DSize):
        network, levels = "MONAI DiffusionModelUNet (3-D)", list(size.channels)
        norm = "group norm, additive time and class embedding"
    else:
        network, levels = "diffusers UNet2DModel", list(size.block_out_channels)
        norm = (
            "group norm scaled and shifted by the time and class embedding (ADM)"
            if size.scale_shift
            else "group norm, additive time and class embedding"
        )
    return {
        "network": network,
        "channels": levels,
        "attention_levels": list(size.attention_levels),
        "norm": norm,
        "prediction": PREDICTION_WORDS[preset.prediction],
        "loss_weighting": WEIGHTING_WORDS[preset.loss_weighting],
        "timesteps": _timestep_words(preset),
    }


def _null_id(run: TrainingRun) -> int:
    """The all-null condition: what the public prior trains and guidance subtracts."""
    return null_condition(run.n_classes) if run.config.covariates else null_class(run.n_classes)


def _conditions(run: TrainingRun, patient_ids: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``(b, k)`` label (or condition) ids of the sampled patients' draws; each part is dropped to its null
    independently with the preset's dropout rate (classifier-free guidance on any subset of the conditions)."""
    b, dropout, slices = len(patient_ids), run.config.preset.label_dropout, run.slices

    def part(values: torch.Tensor, null: int) -> torch.Tensor:
        values = values[patient_ids].view(b, 1).expand(b, k).clone()
        values[torch.rand(b, k, generator=gen, device=gen.device) < dropout] = null
        return values

    labels = part(slices.labels, null_class(run.n_classes))
    declared = run.config.covariates
    if not declared:
        return labels
    sexes = part(slices.sex_ids, SEX_NULL) if "sex" in declared else torch.full_like(labels, SEX_NULL)
    ages = part(slices.age_ids, AGE_NULL) if "age" in declared else torch.full_like(labels, AGE_NULL)
    return encode(labels, sexes, ages, run.n_classes)


def ema_decay_at(step: int, decay_max: float) -> float:
    """The EMA decay applied after step ``step``: warm-up ``(1 + t) / (10 + t)`` up to the preset's decay."""
    return min(decay_max, (1 + step) / (10 + step))


def _update_ema(state: TrainingState, params: dict[str, torch.nn.Parameter], decay_max: float) -> None:
    decay = ema_decay_at(state.step, decay_max)
    with torch.no_grad():
        for name, p in params.items():
            state.ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def _step_info(run: TrainingRun, state: TrainingState, patients: int) -> TrainProgress:
    eps = None
    if run.plan is not None and (state.step % 10 == 0 or state.step == run.total_steps):
        eps = epsilon_of(_history(run, state), delta=run.plan.delta, accountant=run.config.accountant)
    return TrainProgress(
        "dp", step=state.step, total=run.total_steps, loss=state.losses[-1], patients=patients, epsilon=eps
    )


def _history(run: TrainingRun, state: TrainingState) -> list[tuple[float, float, int]]:
    """The model's whole privacy history: the count release, then what the optimiser's hook recorded."""
    assert run.plan is not None and state.accountant is not None
    return [*run.plan.prior, *state.accountant.history]


def _write_bundle(run: TrainingRun, state: TrainingState) -> ModelCard:
    """EMA weights, the card (written last), the private record, the ledger entry and sample grids; returns the
    card."""
    preset = run.config.preset
    final = build_network(preset, run.n_classes, run.config.covariates)
    final.load_state_dict(merged_weights(state.model, {**state.model.state_dict(), **state.ema}))
    history = _history(run, state) if run.plan is not None else []
    epsilon = epsilon_of(history, delta=run.plan.delta, accountant=run.config.accountant) if run.plan else math.inf
    card = _public_card(run, state, history, epsilon)
    write_json_atomic(BundleLayout(run.out).training_record, _private_record(run, state))  # 0600 (mkstemp)
    if run.plan is not None:
        run.store.ledger().record(
            state.run_id,
            [(run.plan.noise_multiplier, run.sample_rate, state.step)],
            status="finished",
            accountant=run.config.accountant,
            model=run.out.name,
            epsilon=epsilon,
            delta=run.plan.delta,
        )
    bundle = wrap_generator(preset, final, card, str(run.device))
    bundle.save(run.out)
    for label in run.store.label_names:
        generated = bundle.generate(labels={label: run.config.samples_per_label}, seed=run.config.seed)
        save_grid(generated.images, BundleLayout(run.out).sample_grid(label))
    return card


def _public_card(run: TrainingRun, state: TrainingState, history: list, epsilon: float) -> ModelCard:
    """The public model card: public choices, the privacy guarantee, and nothing computed from private data
    except the DP patient estimate and the declared, rounded voxel spacing."""
    config, preset, plan, store = run.config, run.config.preset, run.plan, run.store
    row_mm, col_mm, slice_mm = store.spacing()
    scale = store.image_size / preset.image_size
    unit, dims = store.privacy_unit, preset.spatial_dims
    item = "volume" if dims == 3 else "slice"
    card = {
        "format": CARD_FORMAT,
        "created": datetime.now(UTC).date().isoformat(),
        "generator": preset.generator,
        "spatial_dims": dims,
        "labels": {name: i for i, name in enumerate(store.label_names)},
        "null_class": _null_id(run),
        "covariates": config.covariates,
        "image_size": preset.image_size,
        "voxel_spacing_mm": [round(row_mm * scale, 2), round(col_mm * scale, 2), round(slice_mm * scale, 2)]
        if dims == 3
        else [round(row_mm * scale, 2), round(col_mm * scale, 2), slice_mm],
        "voxel_spacing_source": f"median spacing of the store's {item}s rounded to 0.1 mm, scaled to the model's "
        "size: a coarse acquisition statistic of the private store, declared here (not covered by ε)",
        "orientation": ORIENTATION[dims],
        "dp": bool(config.dp),
        "privacy_unit": unit,
        "neighbouring_relation": RELATION if unit == "patient" else "add/remove one image",
        "epsilon": epsilon if config.dp else None,
        "delta": plan.delta if plan else None,
        "target_epsilon": config.epsilon if config.dp else None,
        "target_epsilon_met": bool(plan and epsilon <= config.epsilon * 1.01),  # type: ignore[operator]
        "accountant": config.accountant if config.dp else None,
        "privacy_history": [list(m) for m in history],
        "patients_estimate": store.meta["patients_estimate"] if config.dp else None,
        "noise_multiplier": plan.noise_multiplier if plan else 0.0,
        "max_grad_norm": preset.max_grad_norm if config.dp else None,
        "sampling": f"Poisson sampling of {unit}s at rate q = B / N̂; {preset.slices_per_patient} uniformly chosen "
        f"{item}(s) per sampled {unit}, each under {preset.noise_multiplicity} (timestep, noise) draw(s) "
        f"({_timestep_words(preset)}), averaged before the {unit}'s gradient is clipped",
        "sample_rate": plan.sample_rate if plan else None,
        "expected_batch_size": plan.expected_batch_size if plan else preset.batch_size,
        "steps": state.step,
        "planned_steps": run.planned_steps,
        "stopped_early": state.step < run.planned_steps,
        "epochs": state.step * plan.sample_rate if plan else None,
        "noise_multiplicity": preset.noise_multiplicity,
        "slices_per_patient": preset.slices_per_patient,
        "trainable_parameters": _trainable_summary(state.model, preset),
        "statement": PRIVACY_STATEMENT.format(unit=UNIT_MEANING[unit]) if config.dp else NOT_PRIVATE_STATEMENT,
        "randomness": {"public_seed": config.seed, **RANDOMNESS},
        "preset": preset.as_dict(),
        "public_pretraining": (
            {
                "data": PUBLIC_PRIOR_DESCRIPTION[dims],
                "steps": preset.public_pretrain_steps,
                "batch_size": preset.public_batch_size,
                "focal_anomaly_rate": preset.public_anomaly_rate,
                "privacy": "public data about no patient: spends no ε",
            }
            if preset.public_prior == "mni152" and preset.public_pretrain_steps > 0
            else None
        ),
        "prediction_type": preset.prediction,
        "denoiser": denoiser_summary(preset),
        "ema_decay": preset.ema_decay,
        "ema_decay_last_step": round(ema_decay_at(state.step, preset.ema_decay), 4) if state.step else None,
        "sampler": {"solver": "dpmsolver++", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        "store_id": store.store_id,
        "training_inputs_digest": run.digest,
        "library_versions": _library_versions(),
        "device": run.device.type,
        "world_size": run.world.size,
    }
    if not config.dp:
        card["warning"] = "NOT PRIVATE: trained with --no-dp; later stages refuse it unless explicitly allowed."
    return ModelCard.parse(card)


def _trainable_summary(model: torch.nn.Module, preset: Preset) -> dict:
    trained, total = count_parameters(model)
    which = preset.trainable
    summary = {"set": which, "meaning": TRAINABLE_SETS[which], "trained": trained, "total": total}
    return {**summary, "lora_rank": preset.lora_rank} if which == "lora" else summary


def _private_record(run: TrainingRun, state: TrainingState) -> dict:
    """What the operator may know and the public may not: exact counts, timings, the store fingerprint."""
    return {
        "run_id": state.run_id,
        "n_train_patients": run.slices.n_patients,
        "n_train_slices": len(run.train_images),
        "store_fingerprint": run.store.fingerprint,
        "training_wall_time_s": round(state.elapsed, 1),
        "public_pretraining_wall_time_s": round(state.pretrain_seconds, 1),
        "final_loss": state.losses[-1] if state.losses else None,
    }


def read_training_record(model_dir: Path) -> dict:
    """The private training record of a bundle (``{}`` when absent)."""
    path = BundleLayout(model_dir).training_record
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_private_ok(card: ModelCard, *, allow_not_private: bool) -> None:
    """Refuse a model without a DP guarantee unless the caller explicitly allows it."""
    if not card.dp and not allow_not_private:
        raise PrivacyPolicy(
            "this model was trained WITHOUT differential privacy (model card dp: false); "
            "refusing to use it unless explicitly allowed"
        )
