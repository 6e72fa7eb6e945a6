"""Patient-level DP-SGD training of the class-conditional diffusion model (Opacus).

One step:
1. Opacus' ``UniformWithReplacementSampler`` Poisson-samples *patients* with rate ``q``; Opacus'
   ``BatchMemoryManager`` splits the logical batch into physical batches (an empty batch still steps).
2. Each sampled patient contributes one uniformly chosen slice, seen under ``K`` (timestep, noise) draws
   with label dropout (null class) for classifier-free guidance.
3. Exact per-patient gradients (``train.per_patient_grads``) go into ``p.grad_sample``; Opacus'
   ``DPOptimizer`` clips each patient to ``C``, adds ``N(0, σ²C²)`` and averages over the expected batch;
   the accountant hook records the step.
4. An EMA of the weights is kept (post-processing of DP iterates: free).

Checkpoints (``MODEL_DIR/private/checkpoint.pt``) hold weights, EMA, optimiser, accountant and every random
generator, so ``resume`` continues exactly; Ctrl-C finishes the current step and writes one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from generators.bundle import CARD_FILE, DEFAULT_GUIDANCE, DEFAULT_STEPS, DiffusionModel, resolve_device, save_grid
from generators.diffusion import denoising_loss, noise_schedule, training_scheduler
from generators.errors import Conflict, InvalidInput, PrivacyPolicy
from generators.unet import build_unet, null_class, use_plain_attention
from train.accounting import PrivacyPlan, default_delta, epsilon_spent, plan_privacy
from train.per_patient_grads import make_per_patient_grad_fn
from train.preprocess import resize_slices
from train.presets import Preset
from train.public_prior import DESCRIPTION as PUBLIC_PRIOR_DESCRIPTION
from train.public_prior import cosine_lr, pretrain
from train.store import CohortStore

CHECKPOINT = "checkpoint.pt"
PRIVACY_STATEMENT = (
    "Differential privacy with the PATIENT as the unit: any single patient's entire data (all of their slices "
    "and scans) changes the distribution of the released model by at most (epsilon, delta). Each training step "
    "Poisson-sampled patients, used one slice per sampled patient, clipped each patient's gradient and added "
    "Gaussian noise (DP-SGD). Generating samples from the model is post-processing and spends no budget."
)
NOT_PRIVATE_STATEMENT = "NOT PRIVATE: this model was trained without differential privacy."


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
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    force: bool = False
    samples_per_label: int = 16
    extra: dict = field(default_factory=dict)

    def inputs_digest(self, store_fingerprint: str) -> str:
        """Hash of everything that determines the trained weights (for "reuse if unchanged")."""
        payload = {
            "store": store_fingerprint,
            "preset": self.preset.as_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "dp": self.dp,
            "max_steps": self.max_steps,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainResult:
    card: dict
    reused: bool = False
    interrupted: bool = False


class PatientSlices:
    """Which store rows belong to each training patient, and a uniform pick of one slice per patient."""

    def __init__(self, patients: np.ndarray, labels: np.ndarray) -> None:
        keys, inverse = np.unique(patients, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(keys))
        self.rows = torch.from_numpy(order)
        self.starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.counts = torch.from_numpy(counts)
        self.labels = torch.from_numpy(labels[order][np.concatenate([[0], np.cumsum(counts)[:-1]])].astype(np.int64))
        self.n_patients = len(keys)

    def pick(self, patient_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniformly random slice row per patient id."""
        offsets = (torch.rand(len(patient_ids), generator=generator) * self.counts[patient_ids]).long()
        return self.rows[self.starts[patient_ids] + offsets]


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def train_model(
    config: TrainConfig,
    *,
    progress: Callable[[dict], None] | None = None,
    on_plan: Callable[[PrivacyPlan | None, int], None] | None = None,
) -> TrainResult:
    """Train (or resume, or reuse) a model bundle at ``config.out``; returns its card.

    ``progress`` receives ``{"step", "total", "patients", "loss", "epsilon"}`` after every step (``epsilon``
    every 10 steps). A first Ctrl-C (SIGINT) stops after the current step with a checkpoint.
    """
    stop = _StopFlag()
    with stop.installed():
        return _train(config, stop, progress, on_plan)


def _train(
    config: TrainConfig,
    stop: _StopFlag,
    progress: Callable[[dict], None] | None,
    on_plan: Callable[[PrivacyPlan | None, int], None] | None,
) -> TrainResult:
    if config.dp and (config.epsilon is None or config.epsilon <= 0):
        raise InvalidInput("--epsilon must be positive for DP training")
    store = CohortStore.open(config.store)
    out = Path(config.out)
    digest = config.inputs_digest(store.fingerprint)
    card_path = out / CARD_FILE
    if card_path.is_file() and not config.resume:
        card = json.loads(card_path.read_text())
        if card.get("training_inputs_digest") == digest and not config.force:
            return TrainResult(card=card, reused=True)
        if not config.force:
            raise Conflict(f"{out} already holds a model trained on other inputs; use a new --out or --force")
    private = out / "private"
    checkpoint_path = private / CHECKPOINT
    if config.resume and not checkpoint_path.is_file():
        raise InvalidInput(f"nothing to resume: no checkpoint at {checkpoint_path}")
    if out.exists() and not config.resume and not config.force and any(out.iterdir()):
        raise Conflict(f"{out} exists and is not empty; use a new --out, --resume or --force")
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    if not config.resume:
        card_path.unlink(missing_ok=True)  # the bundle is incomplete until training writes a new card

    preset = config.preset
    device = resolve_device(config.device)
    train_split = store.read("train")
    slices = PatientSlices(train_split.patients, train_split.labels)
    n_patients = slices.n_patients
    if n_patients < 2:
        raise InvalidInput("need at least 2 training patients")
    n_classes = len(store.label_names)
    batch = min(preset.batch_size, n_patients)

    plan: PrivacyPlan | None = None
    if config.dp:
        delta = config.delta if config.delta is not None else default_delta(n_patients)
        plan = plan_privacy(
            target_epsilon=float(config.epsilon),  # type: ignore[arg-type]
            delta=delta,
            n_patients=n_patients,
            expected_batch_size=batch,
            epochs=preset.epochs,
            accountant=config.accountant,
        )
        planned_steps, sample_rate = plan.steps, plan.sample_rate
    else:
        sample_rate = batch / n_patients
        planned_steps = max(1, round(preset.epochs / sample_rate))
    total_steps = min(planned_steps, config.max_steps) if config.max_steps else planned_steps
    if on_plan:
        on_plan(plan, total_steps)

    # 1. model, EMA, optimiser, DP machinery, generators — all seeded (2. the loop, 3. the bundle follow)
    torch.manual_seed(config.seed)
    model = build_unet(image_size=preset.image_size, n_classes=n_classes, size=preset.unet).to(device)
    use_plain_attention(model)
    scheduler = training_scheduler(preset.prediction)  # type: ignore[arg-type]
    alphas = noise_schedule(scheduler).to(device)
    pretrain_seconds = 0.0
    if preset.public_prior == "mni152" and preset.public_pretrain_steps > 0 and not config.resume:
        pretrain_start = time.perf_counter()
        pretrain(
            model,
            steps=preset.public_pretrain_steps,
            batch_size=preset.public_batch_size,
            learning_rate=preset.public_learning_rate,
            alphas_cumprod=alphas,
            prediction=preset.prediction,  # type: ignore[arg-type]
            null_label=null_class(n_classes),
            seed=config.seed + 4,
            device=device,
            progress=(
                (
                    lambda i, loss: progress(
                        {"phase": "public prior", "step": i, "total": preset.public_pretrain_steps, "loss": loss}
                    )
                )
                if progress
                else None
            ),
        )
        pretrain_seconds = time.perf_counter() - pretrain_start
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    base_optimizer = torch.optim.Adam(model.parameters(), lr=preset.learning_rate)
    sampler_gen = torch.Generator().manual_seed(config.seed + 1)
    draw_gen = torch.Generator().manual_seed(config.seed + 2)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 3)
    accountant = create_accountant(mechanism=config.accountant) if config.dp else None
    optimizer: torch.optim.Optimizer
    if config.dp:
        optimizer = DPOptimizer(
            base_optimizer,
            noise_multiplier=plan.noise_multiplier,  # type: ignore[union-attr]
            max_grad_norm=preset.max_grad_norm,
            expected_batch_size=batch,
            loss_reduction="mean",
            generator=noise_gen,
        )
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))  # type: ignore[union-attr]
    else:
        optimizer = base_optimizer
    step, elapsed, losses = 0, 0.0, []

    if config.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["inputs_digest"] != digest:
            raise InvalidInput("the checkpoint was made with other inputs (store, preset or privacy settings)")
        model.load_state_dict(state["model"])
        ema = state["ema"]
        base_optimizer.load_state_dict(state["optimizer"])
        if accountant is not None:
            accountant.load_state_dict(state["accountant"])
        sampler_gen.set_state(state["sampler_gen"])
        draw_gen.set_state(state["draw_gen"])
        noise_gen.set_state(state["noise_gen"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        pretrain_seconds = state.get("pretrain_seconds", 0.0)

    def checkpoint() -> None:
        _save_atomic(
            {
                "inputs_digest": digest,
                "step": step,
                "elapsed": elapsed,
                "pretrain_seconds": pretrain_seconds,
                "losses": losses,
                "model": model.state_dict(),
                "ema": ema,
                "optimizer": base_optimizer.state_dict(),
                "accountant": accountant.state_dict() if accountant is not None else None,
                "sampler_gen": sampler_gen.get_state(),
                "draw_gen": draw_gen.get_state(),
                "noise_gen": noise_gen.get_state(),
            },
            checkpoint_path,
        )
        os.chmod(checkpoint_path, 0o600)

    grad_fn = make_per_patient_grad_fn(model, alphas, preset.prediction)  # type: ignore[arg-type]
    params = dict(model.named_parameters())
    null = null_class(n_classes)
    k = preset.noise_multiplicity
    size = preset.image_size
    poisson = UniformWithReplacementSampler(
        num_samples=n_patients, sample_rate=sample_rate, generator=sampler_gen, steps=max(total_steps - step, 0)
    )
    physical = (
        BatchSplittingSampler(sampler=poisson, max_batch_size=preset.physical_batch_size, optimizer=optimizer)
        if config.dp
        else None
    )

    def draws(patient_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = len(patient_ids)
        rows = slices.pick(patient_ids, draw_gen)
        images = resize_slices(train_split.images[rows.numpy()], size)  # (b, 1, size, size)
        labels = slices.labels[patient_ids].view(b, 1).expand(b, k).clone()
        labels[torch.rand(b, k, generator=draw_gen) < preset.label_dropout] = null
        timesteps = torch.randint(0, len(alphas), (b, k), generator=draw_gen)
        noise = torch.randn(b, k, 1, size, size, generator=draw_gen)
        images = images.view(b, 1, 1, size, size).expand(b, k, 1, size, size)
        return images.to(device), labels.to(device), timesteps.to(device), noise.to(device)

    def update_ema() -> None:
        decay = min(preset.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, p in params.items():
                ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    interrupted = False
    model.train()
    start_time = time.perf_counter() - elapsed
    step_loss: list[float] = []
    step_patients = 0
    batches = iter(physical) if physical is not None else iter(poisson)
    while step < total_steps:
        try:
            ids = torch.tensor(next(batches), dtype=torch.long)
        except StopIteration:
            break
        step_patients += len(ids)
        for group in base_optimizer.param_groups:  # a schedule of the step number only: no data, no ε
            group["lr"] = cosine_lr(preset.learning_rate, step, total_steps)
        if config.dp:
            if len(ids) == 0:  # empty Poisson batch: still a (pure-noise) step
                for p in params.values():
                    p.grad_sample = torch.zeros(0, *p.shape, device=device)
            else:
                grads, patient_losses = grad_fn({n: p.detach() for n, p in params.items()}, *draws(ids))
                for name, p in params.items():
                    p.grad_sample = grads[name]
                step_loss.extend(patient_losses.tolist())
            optimizer.step()
            done = not optimizer._is_last_step_skipped  # type: ignore[attr-defined]  # False mid logical batch
            optimizer.zero_grad(set_to_none=True)
        else:
            images, labels, timesteps, noise = draws(ids) if len(ids) else (None,) * 4
            if images is not None:
                loss = denoising_loss(
                    model,
                    images.flatten(0, 1),
                    labels.flatten(),
                    timesteps.flatten(),
                    noise.flatten(0, 1),
                    alphas,
                    preset.prediction,  # type: ignore[arg-type]
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss.append(loss.item())
            done = True
        if not done:
            continue
        step += 1
        update_ema()
        elapsed = time.perf_counter() - start_time
        losses.append(float(np.mean(step_loss)) if step_loss else float("nan"))
        step_loss = []
        if progress:
            eps = None
            if accountant is not None and (step % 10 == 0 or step == total_steps):
                eps = accountant.get_epsilon(delta=plan.delta)  # type: ignore[union-attr]
            progress(
                {
                    "phase": "dp",
                    "step": step,
                    "total": total_steps,
                    "patients": step_patients,
                    "loss": losses[-1],
                    "epsilon": eps,
                }
            )
        if step % preset.checkpoint_every == 0 or step == total_steps:
            checkpoint()
        step_patients = 0
        if stop.requested:
            checkpoint()
            interrupted = True
            break
    if interrupted:
        return TrainResult(card={"step": step, "total_steps": total_steps}, interrupted=True)

    # 3. bundle: EMA weights, card, sample grids
    final = build_unet(image_size=size, n_classes=n_classes, size=preset.unet)
    final.load_state_dict({**model.state_dict(), **ema})
    epsilon = (
        epsilon_spent(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=sample_rate,
            steps=step,
            delta=plan.delta,  # type: ignore[union-attr]
            accountant=config.accountant,
        )
        if config.dp
        else math.inf
    )
    card = _model_card(
        config, store, plan, slices, train_split, step, planned_steps, epsilon, elapsed, digest, pretrain_seconds
    )
    bundle = DiffusionModel(final, scheduler.config, card, device=str(device))
    bundle.save(out)
    for label in store.label_names:
        generated = bundle.generate(labels={label: config.samples_per_label}, seed=config.seed)
        save_grid(generated.images, out / f"samples_{label}.png")
    return TrainResult(card=card)


def _model_card(
    config, store, plan, slices, train_split, step, planned_steps, epsilon, elapsed, digest, pretrain_seconds
) -> dict:
    preset = config.preset
    row_mm, col_mm, slice_mm = store.spacing()
    scale = store.image_size / preset.image_size
    card = {
        "format": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": {name: i for i, name in enumerate(store.label_names)},
        "null_class": null_class(len(store.label_names)),
        "image_size": preset.image_size,
        "voxel_spacing_mm": [row_mm * scale, col_mm * scale, slice_mm],
        "orientation": "axial slice; rows anterior→posterior, columns patient left→right",
        "dp": bool(config.dp),
        "privacy_unit": "patient",
        "epsilon": epsilon if config.dp else None,
        "delta": plan.delta if config.dp else None,
        "target_epsilon": config.epsilon if config.dp else None,
        "target_epsilon_met": bool(config.dp and epsilon <= config.epsilon * 1.01),
        "accountant": config.accountant if config.dp else None,
        "noise_multiplier": plan.noise_multiplier if config.dp else 0.0,
        "max_grad_norm": preset.max_grad_norm if config.dp else None,
        "sampling": "Poisson sampling of patients; one uniformly chosen slice per sampled patient",
        "sample_rate": plan.sample_rate if config.dp else None,
        "expected_batch_size": plan.expected_batch_size if config.dp else preset.batch_size,
        "steps": step,
        "planned_steps": planned_steps,
        "stopped_early": step < planned_steps,
        "epochs": step * (plan.sample_rate if config.dp else preset.batch_size / slices.n_patients),
        "noise_multiplicity": preset.noise_multiplicity,
        "n_train_patients": slices.n_patients,
        "n_train_slices": len(train_split.labels),
        "statement": PRIVACY_STATEMENT if config.dp else NOT_PRIVATE_STATEMENT,
        "training_wall_time_s": round(elapsed, 1),  # the DP phase; public pretraining reports its own
        "preset": preset.as_dict(),
        "public_pretraining": (
            {
                "data": PUBLIC_PRIOR_DESCRIPTION,
                "steps": preset.public_pretrain_steps,
                "batch_size": preset.public_batch_size,
                "privacy": "public data about no patient: spends no ε",
                "wall_time_s": round(pretrain_seconds, 1),
            }
            if preset.public_prior == "mni152" and preset.public_pretrain_steps > 0
            else None
        ),
        "prediction_type": preset.prediction,
        "ema_decay": preset.ema_decay,
        "sampler": {"solver": "dpmsolver++", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        "seed": config.seed,
        "store_fingerprint": store.fingerprint,
        "training_inputs_digest": digest,
        "library_versions": _library_versions(),
        "device": str(resolve_device(config.device)),
    }
    if not config.dp:
        card["warning"] = "NOT PRIVATE: trained with --no-dp; later stages refuse it unless explicitly allowed."
    return json.loads(json.dumps(card))  # exactly what model_card.json will hold (tuples become lists)


def ensure_private_ok(card: dict, *, allow_not_private: bool) -> None:
    """Refuse a model without a DP guarantee unless the caller explicitly allows it."""
    if not card.get("dp") and not allow_not_private:
        raise PrivacyPolicy(
            "this model was trained WITHOUT differential privacy (model card dp: false); "
            "refusing to use it unless explicitly allowed"
        )
