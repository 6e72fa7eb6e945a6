"""Patient-level DP training: exact per-patient gradients, accounting, the loop, checkpoints and the card."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from safetensors.torch import load_file
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from generators.card import ModelCard
from generators.diffusion import draw_timesteps, noise_schedule, training_scheduler
from generators.diffusion_2d import DiffusionModel
from generators.errors import InvalidInput, PrivacyPolicy
from generators.unet import UNetSize, build_unet, use_plain_attention
from train.accounting import (
    COUNT_NOISE,
    EPSILON_TOLERANCE,
    check_delta,
    count_mechanism,
    default_delta,
    epsilon_of,
    noisy_count,
    plan_privacy,
    public_default_delta,
    solve_noise_multiplier,
)
from train.dp_training import (
    PatientSlices,
    TrainConfig,
    TrainProgress,
    dp_step,
    ensure_private_ok,
    make_dp_optimizer,
    read_training_record,
    start_labels_at_null,
    train_model,
)
from train.per_patient_grads import (
    brute_force_per_patient_grads,
    compile_grad_fn,
    make_per_patient_grad_fn,
    masked_pass,
    padded_ids,
)
from train.poisson import PoissonPasses
from train.presets import PRESETS, get_preset
from train.public_prior import add_focal_anomalies, template_images
from train.store import CohortStore
from train.trainable import count_parameters, freeze_except, merged_weights, prepare_trainable, trainable_names

TINY = UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4)


def tiny_preset(**overrides):
    base = {
        "image_size": 16,
        "unet": TINY,
        "batch_size": 6,
        "physical_batch_size": 4,
        "epochs": 2,
        "checkpoint_every": 2,
        "public_pretrain_steps": 2,
        "public_batch_size": 4,
    }
    return get_preset("cpu-small", **{**base, **overrides})


def random_draws(b: int, k: int, size: int, n_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 1, 1, size, size, generator=gen).expand(b, k, 1, size, size) * 2 - 1
    labels = torch.randint(0, n_classes + 1, (b, k), generator=gen)
    timesteps = torch.randint(0, 1000, (b, k), generator=gen)
    noise = torch.randn(b, k, 1, size, size, generator=gen)
    return images.contiguous(), labels, timesteps, noise


ADM_STYLE = replace(PRESETS["cpu-small"].unet, attention_levels=(False, True, True), scale_shift=True)


@pytest.mark.parametrize(
    ("prediction", "channels_last", "weighting", "size"),
    [
        ("sample", True, "uniform", PRESETS["cpu-small"].unet),
        ("v_prediction", False, "uniform", PRESETS["cpu-small"].unet),
        ("sample", False, "min-snr", PRESETS["cpu-small"].unet),
        ("epsilon", False, "min-snr", ADM_STYLE),
    ],
)
def test_per_patient_gradients_are_exact_on_the_shipped_architecture(
    prediction: str, channels_last: bool, weighting: str, size: UNetSize
) -> None:
    """torch.func per-patient gradients == one backward pass per patient, for the cpu-small UNet (with attention)
    and its ADM-style variant (scale-shift norm, attention at two levels), for each loss weighting the presets may
    choose.

    Run at 16 px to keep the test fast: same blocks, layers and attention as the shipped 32 px model.
    """
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=size)
    use_plain_attention(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    alphas = noise_schedule(training_scheduler(prediction))
    images, labels, timesteps, noise = random_draws(3, 2, 16, 2)  # 3 patients, K = 2 draws
    fn = make_per_patient_grad_fn(model, alphas, prediction, weighting)
    grads, losses = fn({n: p.detach() for n, p in model.named_parameters()}, images, labels, timesteps, noise)
    reference = brute_force_per_patient_grads(model, alphas, prediction, images, labels, timesteps, noise, weighting)
    assert losses.shape == (3,)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-6, msg=name)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    ref_norms = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-7)
    assert torch.all(ref_norms > 0)


def test_flip_mirrors_about_half_of_the_drawn_slices_left_to_right(demo_store, tmp_path: Path) -> None:
    """`flip`: the same private draws give the same slices, half of them mirrored (patient left ↔ right)."""
    from train.dp_training import draw_terms, plan_run

    terms = {}
    for flip in (False, True):
        config = TrainConfig(store=demo_store.store.path, out=tmp_path / "m", preset=tiny_preset(flip=flip), epsilon=8)
        run = plan_run(config, CohortStore.open(demo_store.store.path))
        gen = torch.Generator().manual_seed(3)
        terms[flip] = draw_terms(run, torch.arange(12), gen, m=2, k=2, n_timesteps=1000)[0]
    plain, drawn = terms[False].flatten(0, 1), terms[True].flatten(0, 1)  # 24 slices [1, 16, 16]
    pairs = list(zip(drawn, plain, strict=True))
    mirrored = torch.tensor([torch.equal(d, p.flip(-1)) and not torch.equal(d, p) for d, p in pairs])
    same = torch.tensor([torch.equal(d, p) for d, p in pairs])
    assert bool((mirrored | same).all()) and 4 <= int(mirrored.sum()) <= 20


def test_resident_training_images_give_the_same_draws_as_reading_the_store(demo_store, tmp_path: Path) -> None:
    """Data on the device: the training images held once at the model's size (a tensor on the run's device)
    and the store's memory map resized per pass give identical terms from the same private draws."""
    from train.dp_training import draw_terms, plan_run

    config = TrainConfig(store=demo_store.store.path, out=tmp_path / "m", preset=tiny_preset(flip=True), epsilon=8)
    run = plan_run(config, CohortStore.open(demo_store.store.path))
    assert isinstance(run.train_images, torch.Tensor) and run.train_images.shape[1:] == (1, 16, 16)
    ids = torch.tensor([0, 7, 7, 3, 11])
    resident = draw_terms(run, ids, torch.Generator().manual_seed(5), m=2, k=4, n_timesteps=1000)
    run.train_images = CohortStore.open(demo_store.store.path).read("train").images  # the memory map
    assert isinstance(run.train_images, np.ndarray) and run.train_images.shape[-1] != 16
    streamed = draw_terms(run, ids, torch.Generator().manual_seed(5), m=2, k=4, n_timesteps=1000)
    for a, b in zip(resident, streamed, strict=True):
        assert torch.equal(a, b)


def test_min_snr_weights_are_the_epsilon_loss_capped_at_gamma_for_every_target() -> None:
    """min-SNR-γ weights one draw's ε-error by min(SNR, γ)/SNR whatever the network predicts: for an x0, ε or v
    target the weighted squared error of the same prediction is the same number."""
    from generators.diffusion import loss_weights

    abar = noise_schedule(training_scheduler("sample"))[torch.tensor([5, 300, 600, 950])]
    snr = abar / (1 - abar)
    torch.testing.assert_close(loss_weights(abar, "sample", "min-snr"), snr.clamp(max=5.0))
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    x0_hat = x0 + 0.1 * torch.randn(4, 8, generator=gen)  # one prediction, read as each target
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    eps_hat = (a * x0 + s * eps - a * x0_hat) / s  # the ε that prediction implies for the noisy input
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    per_target = {
        "sample": ((x0_hat - x0) ** 2).mean(1),
        "epsilon": ((eps_hat - eps) ** 2).mean(1),
        "v_prediction": ((v_hat - v) ** 2).mean(1),
    }
    weighted = [loss_weights(abar, target, "min-snr") * error for target, error in per_target.items()]
    torch.testing.assert_close(weighted[0], weighted[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weighted[0], weighted[2], rtol=1e-4, atol=1e-6)
    assert torch.equal(loss_weights(abar, "sample", "uniform"), torch.ones_like(abar))


@pytest.mark.parametrize("which", ["conditioning", "embeddings"])
def test_per_patient_gradients_of_a_trainable_subset_are_exact(which: str) -> None:
    """With part of the UNet frozen and m = 2 slices × K = 2 draws per patient, torch.func gradients of the
    trainable parameters == one backward pass per patient, and frozen parameters get no gradient at all."""
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=PRESETS["cpu-small"].unet)
    use_plain_attention(model)
    trainable = freeze_except(model, which)
    trained, total = count_parameters(model)
    assert 0 < trained < total / 4 and set(trainable) == set(trainable_names(model, which))
    assert "class_embedding.weight" in trainable and "conv_in.weight" not in trainable
    alphas = noise_schedule(training_scheduler("sample"))
    images, labels, timesteps, noise = random_draws(3, 4, 16, 2, seed=5)
    images = torch.cat([images[:, :2], images.flip(0)[:, 2:]], dim=1).contiguous()  # 2 different slices each
    grads, losses = make_per_patient_grad_fn(model, alphas, "sample")(
        {n: p.detach() for n, p in trainable.items()}, images, labels, timesteps, noise
    )
    reference = brute_force_per_patient_grads(model, alphas, "sample", images, labels, timesteps, noise)
    assert set(grads) == set(reference) == set(trainable) and losses.shape == (3,)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-6, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_per_patient_gradients_of_lora_adapters_are_exact() -> None:
    """LoRA adapters on the cpu-small UNet: torch.func gradients of the adapters, label embeddings and norms ==
    one backward pass per patient; the base weights are frozen and get no gradient."""
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=PRESETS["cpu-small"].unet)
    use_plain_attention(model)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 700]), torch.tensor([0, 1])
    before = model(x, t, class_labels=y).sample
    trainable = prepare_trainable(model, "lora", lora_rank=2)
    torch.testing.assert_close(model(x, t, class_labels=y).sample, before)  # B = 0: training starts at the prior
    adapters = [n for n in trainable if ".lora_" in n]
    assert adapters and "class_embedding.weight" in trainable and not any("base_layer" in n for n in trainable)
    assert any(".attentions." in n for n in adapters) and any(".resnets." in n for n in adapters)
    with torch.no_grad():  # non-zero B so that the A matrices get gradients too
        for name in adapters:
            if ".lora_B." in name:
                trainable[name].normal_(0, 0.1)
    alphas = noise_schedule(training_scheduler("sample"))
    images, labels, timesteps, noise = random_draws(3, 2, 16, 2, seed=7)
    grads, _ = make_per_patient_grad_fn(model, alphas, "sample")(
        {n: p.detach() for n, p in trainable.items()}, images, labels, timesteps, noise
    )
    reference = brute_force_per_patient_grads(model, alphas, "sample", images, labels, timesteps, noise)
    assert set(grads) == set(reference) == set(trainable)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-6, msg=name)
    assert all(grads[n].abs().sum() > 0 for n in adapters)
    assert all(p.grad is None for p in model.parameters())


def test_merged_lora_weights_load_into_the_plain_network_and_compute_the_same() -> None:
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    prepare_trainable(model, "lora", lora_rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    plain = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(plain)
    plain.load_state_dict(merged_weights(model, model.state_dict()))  # strict: exactly the plain keys
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 700]), torch.tensor([0, 1])
    torch.testing.assert_close(plain(x, t, class_labels=y).sample, model(x, t, class_labels=y).sample)


def test_labels_start_at_the_null_class_so_conditional_equals_unconditional() -> None:
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900])
    null = torch.full((3,), 2)
    differs = model(x, t, class_labels=torch.tensor([0, 1, 0])).sample - model(x, t, class_labels=null).sample
    assert differs.abs().max() > 1e-3  # random label embeddings: labels change the prediction
    start_labels_at_null(model, 2)
    same = model(x, t, class_labels=torch.tensor([0, 1, 0])).sample - model(x, t, class_labels=null).sample
    assert same.abs().max() == 0


@pytest.mark.slow
def test_frozen_parameters_never_change_and_accounting_is_the_same(demo_store, tmp_path: Path) -> None:
    """A DP run that trains only the conditioning set leaves every other weight at its public initial value,
    moves the trainable ones, and spends exactly what full training spends (same q, σ and steps); so does a
    LoRA run, whose released weights move by low-rank matrices only."""
    cards, weights = {}, {}
    for which in ("all", "conditioning", "lora"):
        rank = {"lora_rank": 2} if which == "lora" else {}
        preset = tiny_preset(public_prior="none", trainable=which, slices_per_patient=2, **rank)
        config = TrainConfig(
            store=_store_copy(demo_store, tmp_path / which),
            out=tmp_path / which / "model",
            preset=preset,
            epsilon=8.0,
            max_steps=3,
            samples_per_label=1,
        )
        cards[which] = train_model(config).card.to_json()
        weights[which] = load_file(tmp_path / which / "model" / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(0)  # the public seed: what training started from
    initial = build_unet(image_size=16, n_classes=2, size=TINY)
    frozen = set(initial.state_dict()) - set(trainable_names(initial, "conditioning"))
    start = initial.state_dict()
    assert frozen and all(torch.equal(weights["conditioning"][n], start[n]) for n in frozen)
    names = trainable_names(initial, "conditioning")
    moved = [n for n in names if not torch.equal(weights["conditioning"][n], start[n])]
    assert len(moved) > len(names) // 2
    assert any(not torch.equal(weights["all"][n], start[n]) for n in frozen)  # full training moves them
    a, c = cards["all"], cards["conditioning"]
    assert a["privacy_history"] == c["privacy_history"] and a["epsilon"] == c["epsilon"]
    assert (a["sample_rate"], a["noise_multiplier"], a["steps"]) == (c["sample_rate"], c["noise_multiplier"], 3)
    assert c["trainable_parameters"]["set"] == "conditioning" and c["slices_per_patient"] == 2
    assert 0 < c["trainable_parameters"]["trained"] < a["trainable_parameters"]["trained"]
    # LoRA: the same accounting; the released weights are the plain network's, each adapted layer moved by a
    # matrix of rank ≤ r (B·A merged in), the layers without adapters (conv_in, conv_out) untouched
    lora = cards["lora"]
    assert lora["privacy_history"] == a["privacy_history"] and lora["steps"] == 3
    assert lora["trainable_parameters"]["set"] == "lora" and lora["trainable_parameters"]["lora_rank"] == 2
    assert set(weights["lora"]) == set(start)
    assert all(torch.equal(weights["lora"][n], start[n]) for n in ("conv_in.weight", "conv_out.weight"))
    adapted = [n for n in start if n.endswith(("conv1.weight", "conv2.weight", "to_q.weight"))]
    deltas = [(weights["lora"][n] - start[n]).flatten(1) for n in adapted]
    assert sum(bool(d.abs().max() > 0) for d in deltas) > len(adapted) // 2
    singular = [torch.linalg.svdvals(d.double()) for d in deltas if d.abs().max() > 0]
    assert all(v[2] < 1e-3 * v[0] for v in singular)  # beyond rank 2: float32 rounding of W + B·A only


def test_opacus_clips_each_patient_with_the_exact_norm() -> None:
    """Our grad_sample fed to Opacus' DPOptimizer gives Σ_i min(1, C/‖g_i‖) g_i (noise off)."""
    torch.manual_seed(1)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    alphas = noise_schedule(training_scheduler("v_prediction"))
    draws = random_draws(4, 1, 16, 2, seed=3)
    grads, _ = make_per_patient_grad_fn(model, alphas, "v_prediction")(
        {n: p.detach() for n, p in model.named_parameters()}, *draws
    )
    reference = brute_force_per_patient_grads(model, alphas, "v_prediction", *draws)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()], 1).norm(dim=1)
    clip = float(norms.median())  # some patients clipped, some not
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=4,
        loss_reduction="sum",
    )
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    optimizer.clip_and_accumulate()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        expected = torch.einsum("i,i...", factors, reference[name])
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-6)


def _summed_clipped(model: torch.nn.Module, grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Opacus' clipped sum of the given per-patient gradients (noise off)."""
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4
    )
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    optimizer.clip_and_accumulate()
    summed = {name: p.summed_grad.clone() for name, p in model.named_parameters()}
    optimizer.zero_grad(set_to_none=True)
    return summed


def test_a_padded_pass_gives_the_clipped_sum_of_the_unpadded_one_and_an_empty_pass_still_adds_noise() -> None:
    """Fixed-shape passes (the GPU path): 3 real patients padded to 8 rows clip and sum to exactly what the 3
    alone give; a pass with nobody real is all zeros before noise and pure noise after (Opacus)."""
    torch.manual_seed(2)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    alphas = noise_schedule(training_scheduler("sample"))
    fn = make_per_patient_grad_fn(model, alphas, "sample")
    params = {n: p.detach() for n, p in model.named_parameters()}
    draws = random_draws(8, 2, 16, 2, seed=4)  # rows 3..7 hold other (padding) patients' draws
    ids, real = padded_ids(torch.tensor([5, 1, 2]), 8)
    assert ids.tolist() == [5, 1, 2, 0, 0, 0, 0, 0] and real.tolist() == [True] * 3 + [False] * 5
    with pytest.raises(ValueError, match="does not fit"):
        padded_ids(torch.arange(9), 8)

    padded, losses = masked_pass(fn, params, draws, real)
    alone, alone_losses = fn(params, *(t[:3] for t in draws))
    assert torch.all(losses[3:] == 0) and torch.allclose(losses[:3], alone_losses)
    for name, g in padded.items():
        assert torch.all(g[3:] == 0), name
    expected, got = _summed_clipped(model, alone, clip=0.05), _summed_clipped(model, padded, clip=0.05)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)

    nobody, _ = masked_pass(fn, params, draws, torch.zeros(8, dtype=torch.bool))
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=400, batch_size=8, epochs=4)
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), plan, max_grad_norm=0.05, generator=torch.Generator()
    )
    for name, p in model.named_parameters():
        p.grad_sample = nobody[name]
    assert optimizer.pre_step()
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected_std = plan.noise_multiplier * 0.05 / plan.expected_batch_size
    assert update.std().item() == pytest.approx(expected_std, rel=0.05)  # the noise, and nothing else


@pytest.mark.slow
def test_compiled_per_patient_gradients_equal_the_eager_ones(demo_store, tmp_path: Path) -> None:
    """``--compile``: torch.compile traces the vmap'd per-patient gradients (here with the aot_eager backend —
    Dynamo's capture and AOT autograd without code generation, which takes minutes on a CPU) and they equal the
    eager ones; the plain upsampling that tracing needs computes exactly what interpolate did."""
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(5)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    upsampler = next(m for m in model.modules() if isinstance(m, Upsample2D))
    x = torch.randn(3, 16, 4, 4)
    interpolated = upsampler(x)
    alphas = noise_schedule(training_scheduler("sample"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    draws = random_draws(4, 2, 16, 2, seed=7)
    eager, eager_losses = make_per_patient_grad_fn(model, alphas, "sample")(params, *draws)
    compiled = compile_grad_fn(make_per_patient_grad_fn(model, alphas, "sample"), model, backend="aot_eager")
    assert torch.equal(upsampler(x), interpolated)
    grads, losses = compiled(params, *draws)
    torch.testing.assert_close(losses, eager_losses)
    for name in eager:
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-5, atol=1e-7, msg=name)
    assert tiny_preset(compile=True).fixed_shape  # --compile pads every pass to one shape (any 2-D preset)
    with pytest.raises(InvalidInput, match="fixed-shape"):
        tiny_preset(compile=True, fixed_shape=False)
    store = _store_copy(demo_store, tmp_path)  # its own ledger: other tests' runs write to the shared one
    ledger = store / "privacy_ledger.jsonl"
    entries = ledger.read_text()
    bf16 = tiny_preset(fixed_shape=True, precision="bf16", compile=True)  # inductor's CPU code fails for bf16
    with pytest.raises(InvalidInput, match="C\\+\\+ code generation"):
        train_model(TrainConfig(store=store, out=tmp_path / "m", preset=bf16, epsilon=8.0, device="cpu"))
    assert ledger.read_text() == entries and not (tmp_path / "m").exists()  # refused before spending anything


def test_bf16_autocast_keeps_every_clipped_patient_gradient_within_the_bound() -> None:
    """The guarantee under mixed precision: gradients come back fp32 (norms, clipping and noise in fp32), close
    to the fp32 ones, and every clipped per-patient gradient has norm ≤ C."""
    torch.manual_seed(3)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    alphas = noise_schedule(training_scheduler("sample"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    draws = random_draws(6, 2, 16, 2, seed=5)
    exact, _ = make_per_patient_grad_fn(model, alphas, "sample")(params, *draws)
    mixed, losses = make_per_patient_grad_fn(model, alphas, "sample", precision="bf16")(params, *draws)
    assert losses.dtype == torch.float32 and all(g.dtype == torch.float32 for g in mixed.values())
    flat = torch.cat([g.flatten(1) for g in mixed.values()], 1)
    reference = torch.cat([g.flatten(1) for g in exact.values()], 1)
    assert not torch.equal(flat, reference)  # bf16 really ran
    assert torch.all(torch.nn.functional.cosine_similarity(flat, reference, dim=1) > 0.95)

    norms = flat.norm(dim=1)
    clip = float(norms.median()) / 2  # every patient clipped
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=6
    )
    for name, p in model.named_parameters():
        p.grad_sample = mixed[name]
    optimizer.clip_and_accumulate()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = (flat * factors[:, None]).norm(dim=1)
    assert torch.all(clipped_norms <= clip * (1 + 1e-5))
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(summed, (flat * factors[:, None]).sum(0), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------- an independent accountant, for the tests
def independent_rdp_epsilon(history, delta: float) -> float:
    """ε from the RDP of the Poisson-subsampled Gaussian at integer orders (Mironov, Talwar, Zhang 2019, eq. for
    integer α), composed additively and converted with ε = RDP + log(1/δ)/(α−1): a textbook upper bound written
    here from the paper, sharing no code with Opacus."""
    best = math.inf
    for alpha in range(2, 256):
        rdp = 0.0
        for sigma, q, steps in history:
            if q == 1.0:  # no subsampling: the Gaussian mechanism's RDP is α / (2σ²)
                rdp += steps * alpha / (2 * sigma**2)
                continue
            k = np.arange(alpha + 1)
            log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
            terms = log_binom + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2)
            rdp += steps * logsumexp(terms) / (alpha - 1)
        best = min(best, rdp + math.log(1 / delta) / (alpha - 1))
    return best


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε(δ) of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018), by bisection."""

    def delta_of(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def test_privacy_plan_spends_the_target_and_agrees_with_independent_accounting() -> None:
    prior = [count_mechanism()]
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=800, batch_size=256, epochs=100, prior=prior)
    assert plan.sample_rate == pytest.approx(0.32) and plan.steps == 312 and plan.expected_batch_size == 256
    assert plan.history() == [count_mechanism(), (plan.noise_multiplier, 0.32, 312)]
    spent = epsilon_of(plan.history(), delta=1e-5)
    assert 7.8 <= spent <= 8.0 + 1e-6
    # an accountant written from the paper bounds the same history from above, and not by much
    rdp_bound = independent_rdp_epsilon(plan.history(), 1e-5)
    assert spent <= rdp_bound <= 1.25 * spent
    # Opacus' RDP (fractional orders, the tighter Balle et al. 2020 conversion) sits between the two
    assert spent <= epsilon_of(plan.history(), delta=1e-5, accountant="rdp") <= rdp_bound
    assert epsilon_of(plan.history(156), delta=1e-5) < spent  # fewer steps spend less
    rdp = plan_privacy(
        target_epsilon=8.0, delta=1e-5, patients_estimate=800, batch_size=256, epochs=100, accountant="rdp"
    )
    assert rdp.noise_multiplier > plan.noise_multiplier  # PRV is the tighter accountant
    looser = plan_privacy(target_epsilon=2.0, delta=1e-5, patients_estimate=800, batch_size=256, epochs=100)
    assert looser.noise_multiplier > plan.noise_multiplier
    assert epsilon_of([], delta=1e-5) == 0.0
    # without subsampling the composition of Gaussians is one Gaussian: an exact closed form to check against
    exact = analytic_gaussian_epsilon((1 / COUNT_NOISE**2 + 4 / 3.0**2) ** -0.5, 1e-5)
    assert epsilon_of([count_mechanism(), (3.0, 1.0, 4)], delta=1e-5) == pytest.approx(exact, rel=0.02)
    # the DP count costs little next to training (why keeping N private is cheap)
    alone = epsilon_of([(4.868, 0.64, 156)], delta=1e-5)
    assert alone < epsilon_of([count_mechanism(), (4.868, 0.64, 156)], delta=1e-5) < alone + 0.05


@pytest.mark.parametrize(
    ("target", "q", "steps"),
    [(8.0, 0.32, 312), (1.0, 0.3, 200), (50.0, 0.1, 10), (20.0, 0.5, 2), (8.0, 0.01, 5000)],
)
def test_the_solved_noise_spends_the_target_within_tolerance_and_no_less_noise_would(target, q, steps) -> None:
    """σ from σ < 1 to σ ≈ 50: spent within EPSILON_TOLERANCE under the target, and a 3 % smaller σ would
    overspend."""
    prior = [count_mechanism()]
    sigma = solve_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, prior=prior, accountant="rdp"
    )
    spent = epsilon_of([*prior, (sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert target - EPSILON_TOLERANCE <= spent <= target
    assert epsilon_of([*prior, (sigma * 0.97, q, steps)], delta=1e-5, accountant="rdp") > target


def test_the_patient_count_is_released_with_gaussian_noise_from_os_entropy() -> None:
    draws = np.array([noisy_count(800) for _ in range(4000)])
    assert abs(draws.mean() - 800) < 1.0 and abs(draws.std() - COUNT_NOISE) < 0.6
    assert len({tuple(noisy_count(800) for _ in range(20)) for _ in range(2)}) == 2  # not replayable
    assert noisy_count(0) >= 1


def test_delta_rules_and_bad_plans() -> None:
    for n in (10, 800, 5000, 200_000):
        assert default_delta(n) <= 0.1 / n and default_delta(n) <= 1e-5
    assert public_default_delta(800) <= 0.1 / (800 + 4 * COUNT_NOISE)
    with pytest.raises(InvalidInput, match="1/N"):
        check_delta(0.01, 800)
    with pytest.raises(InvalidInput, match="1/N"):
        check_delta(1 / 800, 800)
    assert "1/(10" in check_delta(5e-4, 800)
    assert check_delta(1e-5, 800) is None
    with pytest.raises(InvalidInput, match="epsilon"):
        plan_privacy(target_epsilon=0, delta=1e-5, patients_estimate=800, batch_size=10, epochs=1)
    with pytest.raises(InvalidInput, match="already spent"):
        plan_privacy(target_epsilon=0.1, delta=1e-5, patients_estimate=800, batch_size=10, epochs=1, prior=[(1, 1, 1)])
    with pytest.raises(InvalidInput, match="too small for 100 steps"):  # RDP's conversion alone spends more at σ = 1e4
        solve_noise_multiplier(target_epsilon=0.05, delta=1e-5, sample_rate=0.001, steps=100, accountant="rdp")
    for too_large in (80, 1024):  # q = B / N̂ ≥ 1: sampling would amplify nothing; refused with the fix
        with pytest.raises(InvalidInput, match=r"q = 1\).*below 80, e.g. 40"):
            plan_privacy(target_epsilon=8, delta=1e-5, patients_estimate=80, batch_size=too_large, epochs=2)
    assert plan_privacy(target_epsilon=8, delta=1e-5, patients_estimate=80, batch_size=79, epochs=2).sample_rate < 1
    with pytest.raises(InvalidInput, match="preset"):
        get_preset("tpu-huge")
    with pytest.raises(InvalidInput, match="trainable lora only"):
        get_preset("cpu-small", lora_rank=8)  # would be silently ignored
    assert get_preset("cpu-small", trainable="lora", lora_rank=8).lora_rank == 8
    with pytest.raises(InvalidInput, match="timestep sampling"):
        get_preset("cpu-small", timestep_sampling="late")
    # --physical-batch-size counts slices × draws per pass: m·K of them per patient, never zero patients
    assert get_preset("cpu-small").patients_per_pass == 128
    assert get_preset("cpu-quality").patients_per_pass == 32
    assert (
        get_preset("cpu-small", slices_per_patient=3, noise_multiplicity=2, physical_batch_size=4).patients_per_pass
        == 1
    )


def test_dp_noise_has_the_expected_scale_and_an_empty_step_still_moves() -> None:
    """Fails if the noise is switched off or mis-scaled: update − clipped mean ~ 𝒩(0, (σC/(qN̂))²) per coordinate."""
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    alphas = noise_schedule(training_scheduler("sample"))
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=400, batch_size=8, epochs=4)
    clip = 0.01
    params = dict(model.named_parameters())
    d = sum(p.numel() for p in params.values())
    draws = random_draws(8, 1, 16, 2, seed=1)
    grads, _ = make_per_patient_grad_fn(model, alphas, "sample")({n: p.detach() for n, p in params.items()}, *draws)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    assert torch.all(norms > clip)  # every patient is clipped: the clipped sum is known exactly
    clipped_mean = {n: torch.einsum("i,i...", clip / norms, g) / plan.expected_batch_size for n, g in grads.items()}

    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), plan, max_grad_norm=clip, generator=torch.Generator()
    )
    for name, p in params.items():
        p.grad_sample = grads[name]
    assert optimizer.pre_step()  # clip, noise, scale
    deviation = torch.cat([(p.grad - clipped_mean[n]).flatten() for n, p in params.items()])
    expected_std = plan.noise_multiplier * clip / plan.expected_batch_size
    assert deviation.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(deviation.mean().item()) < 5 * expected_std / math.sqrt(d)
    optimizer.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():  # an empty Poisson batch: nobody sampled, the step is pure noise
        p.grad_sample = torch.zeros(0, *p.shape)
    optimizer.step()
    moved = torch.cat([(p.detach() - before[n]).flatten() for n, p in params.items()])
    assert moved.std().item() == pytest.approx(expected_std, rel=0.05)


class _SkipSignals:
    """Records what Opacus' batch splitter tells the optimizer (the only method it calls)."""

    def __init__(self) -> None:
        self.skips: list[bool] = []

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self.skips.append(do_skip)


@pytest.mark.parametrize(("n", "q", "per_pass"), [(40, 0.3, 4), (40, 0.05, 3), (7, 1.0, 2), (25, 0.5, None)])
def test_poisson_passes_draw_and_split_exactly_as_opacus_does(n: int, q: float, per_pass: int | None) -> None:
    """Same generator state → the same batches, in the same passes, with the step ending where Opacus' ends
    (so the sampling law and the accountant's q are Opacus'); here on the CPU, on the device in a GPU run. The
    units are a rank's share (every other patient), so ids map through them."""
    units = torch.arange(1, 2 * n, 2)
    ours = list(PoissonPasses(units, q, torch.Generator().manual_seed(5), steps=30, per_pass=per_pass))
    opacus = UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(5), steps=30
    )
    if per_pass is None:
        theirs = [[units[batch].tolist()] for batch in opacus]
    else:
        signals = _SkipSignals()
        theirs, step = [], []
        for batch in BatchSplittingSampler(sampler=opacus, max_batch_size=per_pass, optimizer=signals):  # type: ignore[arg-type]
            step.append(units[batch].tolist())
            if not signals.skips[-1]:  # the logical batch ends here
                theirs.append(step)
                step = []
        assert not step
    assert [[p.tolist() for p in passes] for passes in ours] == theirs
    assert len(ours) == 30 and all(len(p) <= (per_pass or n) for passes in ours for p in passes)
    if q < 0.1:
        assert any(passes == [] or passes[0].numel() == 0 for passes in ours)  # empty steps are steps (P ≈ 0.8)


def test_a_dp_step_split_into_passes_updates_as_the_unsplit_step() -> None:
    """Clipped gradients accumulate over a step's passes and only the last pass noises and steps: 7 patients
    in passes of 3, 3, 1 move the weights as the 7 in one pass do (same noise generator state)."""
    torch.manual_seed(3)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fn = make_per_patient_grad_fn(model, noise_schedule(training_scheduler("sample")), "sample")
    terms = random_draws(7, 2, 16, 2, seed=6)
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=400, batch_size=8, epochs=4)
    preset = tiny_preset()
    after = []
    for passes in ([torch.arange(7)], list(torch.tensor_split(torch.arange(7), [3, 6]))):
        model.load_state_dict(start)
        params = dict(model.named_parameters())
        optimizer = make_dp_optimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            plan,
            max_grad_norm=0.05,
            generator=torch.Generator().manual_seed(9),
        )
        losses = dp_step(
            preset, fn, params, passes, lambda ids: [t[ids] for t in terms], optimizer, torch.device("cpu")
        )
        assert losses.shape == (7,)
        after.append({n: p.detach().clone() for n, p in params.items()})
    moved = torch.cat([(after[0][n] - start[n]).flatten() for n in start])
    assert moved.abs().max() > 0
    for name in start:
        torch.testing.assert_close(after[1][name], after[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_logit_normal_timesteps_favour_mid_noise_and_reach_every_level() -> None:
    uniform = draw_timesteps((200_000,), 1000, torch.Generator().manual_seed(0))
    focused = draw_timesteps((200_000,), 1000, torch.Generator().manual_seed(0), "logit-normal")
    for t in (uniform, focused):
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    middle = ((focused >= 250) & (focused < 750)).float().mean().item()
    assert abs(((uniform >= 250) & (uniform < 750)).float().mean().item() - 0.5) < 0.01
    assert abs(middle - 0.728) < 0.01  # P(|z| < ln 3) for z ~ N(0, 1)
    assert (focused < 20).sum() > 0 and (focused > 980).sum() > 0  # the ends stay trained, only less often
    with pytest.raises(ValueError, match="timestep sampling"):
        draw_timesteps((4,), 1000, torch.Generator(), "late")


def test_logit_normal_mean_moves_the_focus() -> None:
    def median(mean: float) -> float:
        draws = draw_timesteps((100_000,), 1000, torch.Generator().manual_seed(0), "logit-normal", mean)
        return draws.float().median().item()

    assert abs(median(0.0) - 500) < 5
    assert abs(median(1.0) - 731) < 5 and abs(median(-1.0) - 269) < 5  # 1000 · sigmoid(±1)
    assert get_preset("cpu-small", timestep_mean=-1.0).timestep_mean == -1.0
    with pytest.raises(InvalidInput, match="logit-normal timestep sampling only"):
        get_preset("cpu-small", timestep_sampling="uniform", timestep_mean=1.0)  # would be silently ignored
    with pytest.raises(InvalidInput, match=r"\[-3, 3\]"):
        get_preset("cpu-small", timestep_mean=4.0)


def test_focal_anomalies_of_the_public_prior_stay_inside_tissue_and_only_where_chosen() -> None:
    images = template_images(32)[:8].repeat(8, 1, 1, 1)  # 64 public template slices
    untouched = add_focal_anomalies(images, torch.Generator().manual_seed(0), rate=0.0)
    assert torch.equal(untouched, images)
    changed = add_focal_anomalies(images, torch.Generator().manual_seed(1), rate=0.5)
    assert torch.equal(changed, add_focal_anomalies(images, torch.Generator().manual_seed(1), rate=0.5))
    delta = (changed - images).abs()
    assert changed.min() >= -1.0 and changed.max() <= 1.0
    assert delta[images <= -0.8].max() == 0  # background (no tissue) never changes
    hit = delta.flatten(1).max(dim=1).values > 0.05
    assert 16 <= hit.sum() <= 48  # about half the slices (binomial 64 × 0.5)
    area = (delta > 0.05).flatten(1).float().sum(dim=1)[hit]
    assert area.max() < 0.5 * 32 * 32  # focal: a patch, not the whole slice
    every = add_focal_anomalies(images, torch.Generator().manual_seed(2), rate=1.0)
    assert ((every - images).abs().flatten(1).max(dim=1).values > 0.05).float().mean() > 0.9
    assert get_preset("cpu-small", public_anomaly_rate=0.5).public_anomaly_rate == 0.5
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        get_preset("cpu-small", public_anomaly_rate=1.5)
    with pytest.raises(InvalidInput, match="2-D mni152 public prior only"):
        get_preset("cpu-3d", public_anomaly_rate=0.5)


def test_one_slice_per_sampled_patient_with_several_scans(demo_store) -> None:
    """Patients with two scans (NIfTI + DICOM) contribute one slice per step, drawn uniformly over both scans;
    with m > 1, each pick is m of the patient's own slices."""
    train = demo_store.store.read("train")
    slices = PatientSlices(train.patients, train.labels)
    counts = slices.counts.numpy()
    assert counts.max() == 8 and counts.min() == 4  # several patients have two 4-slice scans
    many = int(np.argmax(counts))
    ids = torch.tensor([many] * 4000 + list(range(slices.n_patients)))
    rows = slices.pick(ids, torch.Generator().manual_seed(0)).numpy()
    assert len(rows) == len(ids)  # exactly one slice per sampled patient
    owner = np.asarray(train.patients)
    keys = np.unique(owner)
    assert all(owner[r] == keys[i] for r, i in zip(rows, ids.tolist(), strict=True))
    picked = np.bincount(rows[:4000], minlength=len(owner))[owner == keys[many]]
    assert len(picked) == 8 and picked.min() > 400  # all 8 slices of both scans, about 500 each
    several = slices.pick(ids[-50:], torch.Generator().manual_seed(1), 3).numpy()
    assert several.shape == (50, 3)
    assert all(owner[r] == keys[i] for row, i in zip(several, ids[-50:].tolist(), strict=True) for r in row)


@pytest.mark.slow
def test_training_writes_a_complete_bundle(demo_store, tmp_path: Path) -> None:
    out = tmp_path / "model"
    seen: list[TrainProgress] = []
    adm = tiny_preset(unet=replace(TINY, scale_shift=True), loss_weighting="min-snr")  # the ADM-style variant
    config = TrainConfig(store=demo_store.store.path, out=out, preset=adm, epsilon=8.0, samples_per_label=2)
    result = train_model(config, progress=seen.append)
    assert isinstance(result.card, ModelCard) and not result.interrupted  # a typed card, not a dict
    assert "(ADM)" in result.card.denoiser["norm"] and result.card.denoiser["loss_weighting"].startswith("min-SNR")
    assert json.loads((out / "config.json").read_text())["resnet_time_scale_shift"] == "scale_shift"  # reloads
    assert all(isinstance(s, TrainProgress) for s in seen) and seen[-1].epsilon == pytest.approx(result.card.epsilon)
    card = result.card.to_json()
    assert [s.step for s in seen if s.phase == "public prior"] == [1, 2]
    assert [s.step for s in seen if s.phase == "dp"] == list(range(1, card["steps"] + 1))
    assert card["public_pretraining"]["steps"] == 2 and "no ε" in card["public_pretraining"]["privacy"]
    assert card["public_pretraining"]["focal_anomaly_rate"] == 0.0
    assert card["ema_decay_last_step"] == round(min(card["ema_decay"], (1 + card["steps"]) / (10 + card["steps"])), 4)
    for key in (
        "labels",
        "image_size",
        "voxel_spacing_mm",
        "dp",
        "epsilon",
        "delta",
        "accountant",
        "neighbouring_relation",
        "privacy_history",
        "patients_estimate",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "epochs",
        "noise_multiplicity",
        "privacy_unit",
        "target_epsilon_met",
        "randomness",
        "library_versions",
        "store_id",
    ):
        assert key in card, key
    assert card["dp"] is True and card["privacy_unit"] == "patient"
    assert card["neighbouring_relation"] == "add/remove one patient"
    assert card["epsilon"] <= 8.0 * 1.01 and card["target_epsilon_met"]
    assert card["delta"] < 0.1 / 12 and card["labels"] == {"healthy": 0, "lesion": 1}
    assert card["store_id"] == demo_store.store.store_id
    # nothing computed from the exact private counts, the private randomness or the store's bytes is public
    for private_key in ("n_train_patients", "n_train_slices", "training_wall_time_s", "store_fingerprint", "seed"):
        assert private_key not in card, private_key
    assert card["patients_estimate"]["value"] == demo_store.store.patients_estimate
    assert card["sample_rate"] == pytest.approx(6 / demo_store.store.patients_estimate)
    assert "not reproducible" in card["randomness"]["statement"] and card["randomness"]["public_seed"] == 0
    assert demo_store.store.fingerprint not in json.dumps(card)
    record = read_training_record(out)  # the operator's record: exact counts, timings, the fingerprint
    assert record["n_train_patients"] == 12 and record["store_fingerprint"] == demo_store.store.fingerprint
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "model_card.json", "scheduler", "private"} <= names
    assert not any(name.endswith(".png") for name in names)  # the unfiltered grids are internal, in private/
    assert {"unfiltered_samples_healthy.png", "unfiltered_samples_lesion.png"} <= {
        p.name for p in (out / "private").iterdir()
    }
    assert json.loads((out / "model_card.json").read_text()) == card

    # the card's ε is what the accountant fed by the optimiser's step hook recorded, composed with the count
    checkpoint = torch.load(out / "private" / "checkpoint.pt", weights_only=False)
    assert oct(os.stat(out / "private" / "checkpoint.pt").st_mode & 0o777) == "0o600"
    hooked = [tuple(m) for m in checkpoint["accountant"]["history"]]
    assert hooked == [(card["noise_multiplier"], card["sample_rate"], card["steps"])]
    assert card["privacy_history"] == [list(count_mechanism()), list(hooked[0])]
    assert card["epsilon"] == pytest.approx(epsilon_of([*hooked, count_mechanism()], delta=card["delta"]))
    assert card["epsilon"] <= independent_rdp_epsilon(card["privacy_history"], card["delta"])

    model = DiffusionModel.load(out, device="cpu")
    a = model.generate(labels={"healthy": 2, "lesion": 1}, seed=5, steps=4)
    b = model.generate(labels={"healthy": 2, "lesion": 1}, seed=5, steps=4)
    c = model.generate(labels=["healthy"], seed=6, steps=4)
    assert a.images.shape == (3, 1, 16, 16) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= -1 and float(a.images.max()) <= 1
    assert torch.equal(a.images, b.images) and a.labels == ["healthy", "healthy", "lesion"]
    assert list(a.seeds) == [5, 6, 7]
    # a sample is reproducible from its own seed (up to float differences between batch sizes)
    torch.testing.assert_close(c.images[0], a.images[1], atol=1e-5, rtol=0)
    with pytest.raises(InvalidInput, match="valid labels are"):
        model.generate(labels={"tumour": 1}, seed=0)
    with pytest.raises(InvalidInput, match="non-negative"):
        model.generate(labels={"healthy": -1}, seed=0)
    with pytest.raises(InvalidInput, match="at most"):
        model.generate(labels={"healthy": 10**6}, seed=0)

    again = train_model(config)
    assert again.reused  # unchanged inputs: the bundle is reused, not retrained (and no ε is spent again)


@pytest.mark.slow
def test_the_same_public_seed_gives_different_dp_weights(demo_store, tmp_path: Path) -> None:
    """The DP noise and sampling come from OS entropy: two runs of the same command differ."""
    weights = []
    for name in ("a", "b"):
        config = TrainConfig(
            store=demo_store.store.path, out=tmp_path / name, preset=tiny_preset(), epsilon=8.0, samples_per_label=1
        )
        train_model(config)
        weights.append(load_file(tmp_path / name / "diffusion_pytorch_model.safetensors"))
    a, b = weights
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight") and a[k].numel() > 16)


def _interrupt_at(step: int):
    """A progress callback that presses Ctrl-C once the DP phase reaches ``step``."""

    def on_progress(info: TrainProgress) -> None:
        if info.phase == "dp" and info.step == step:
            signal.raise_signal(signal.SIGINT)

    return on_progress


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(demo_store, tmp_path: Path) -> None:
    """From one checkpoint, continuing straight or with another interruption gives identical weights."""

    def config(out: Path, resume: bool = False) -> TrainConfig:
        preset = tiny_preset(epochs=40, checkpoint_every=100)
        return TrainConfig(
            store=demo_store.store.path,
            out=out,
            preset=preset,
            epsilon=8.0,
            max_steps=7,
            resume=resume,
            samples_per_label=1,
        )

    first = train_model(config(tmp_path / "a"), progress=_interrupt_at(2))
    assert first.interrupted and first.card is None and (first.stopped_at, first.total_steps) == (2, 7)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    straight = train_model(config(tmp_path / "a", resume=True))
    again = train_model(config(tmp_path / "b", resume=True), progress=_interrupt_at(5))
    assert again.interrupted and again.stopped_at == 5
    twice = train_model(config(tmp_path / "b", resume=True))
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.card == twice.card and straight.card.steps == 7


@pytest.mark.slow
@pytest.mark.parametrize("gpu_path", [{}, {"fixed_shape": True, "precision": "bf16"}], ids=["plain", "padded-bf16"])
def test_empty_poisson_batches_still_step_and_count(demo_store, tmp_path: Path, gpu_path: dict) -> None:
    """Also along the GPU path's step (passes padded to one shape, bf16 autocast), run here on the CPU."""
    seen: list[TrainProgress] = []
    preset = tiny_preset(batch_size=1, epochs=3.0, **gpu_path)  # q = 1/12: about a third of the steps sample nobody
    config = TrainConfig(
        store=demo_store.store.path, out=tmp_path / "m", preset=preset, epsilon=50.0, samples_per_label=1
    )
    card = train_model(config, progress=seen.append).card.to_json()
    seen = [s for s in seen if s.phase == "dp"]
    assert any(s.patients == 0 for s in seen)  # P(no empty batch in 36 steps) ≈ 2e-7
    assert card["steps"] == len(seen) == 36
    expected = epsilon_of([count_mechanism(), (card["noise_multiplier"], card["sample_rate"], 36)], delta=card["delta"])
    assert card["epsilon"] == pytest.approx(expected)  # the accountant counted every step, empty ones included
    assert all(math.isfinite(s.loss) for s in seen if s.patients)
    assert (card["preset"]["fixed_shape"], card["preset"]["precision"]) == (
        gpu_path.get("fixed_shape", False),
        gpu_path.get("precision", "fp32"),
    )


def _store_copy(demo_store, tmp_path: Path, *, budget: float | None = None) -> Path:
    """A private copy of the demo store with a fresh ledger (only the ingest-time count release, not the runs of
    other tests), optionally with another privacy budget."""
    path = tmp_path / "store"
    shutil.copytree(demo_store.store.path, path)
    ledger = path / "privacy_ledger.jsonl"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")
    if budget is not None:
        meta = json.loads((path / "store.json").read_text())
        meta["budget"]["epsilon"] = budget
        (path / "store.json").write_text(json.dumps(meta))
    return path


@pytest.mark.slow
def test_the_store_ledger_composes_runs_and_refuses_past_the_budget(demo_store, tmp_path: Path) -> None:
    store_path = _store_copy(demo_store, tmp_path, budget=10.0)

    def config(name: str, epsilon: float, **extra) -> TrainConfig:
        preset = tiny_preset(public_pretrain_steps=0)
        return TrainConfig(store=store_path, out=tmp_path / name, preset=preset, epsilon=epsilon, **extra)

    ledger = CohortStore.open(store_path).ledger()
    count_only = ledger.budget().spent
    assert 0 < count_only < 0.5  # the DP patient count, released at ingestion
    first = train_model(config("a", 8.0, samples_per_label=1)).card.to_json()
    after_one = ledger.budget().spent
    assert after_one == pytest.approx(first["epsilon"], rel=0.02)
    with pytest.raises(PrivacyPolicy, match="budget 10"):
        train_model(config("b", 8.0))
    assert not (tmp_path / "b" / "model_card.json").exists()
    second = train_model(config("b", 8.0, allow_over_budget=True, samples_per_label=1)).card.to_json()
    both = ledger.budget().spent
    assert max(first["epsilon"], second["epsilon"]) < both < first["epsilon"] + second["epsilon"]  # not a naive sum
    assert [e["status"] for e in ledger.entries()] == ["released", "reserved", "finished", "reserved", "finished"]
    info = subprocess.run([sys.executable, "-m", "app.cli", "info", str(store_path)], capture_output=True, text=True)
    assert info.returncode == 0 and f"spent ε = {both:.2f} of 10" in info.stdout

    train_model(config("c", None, dp=False, max_steps=1, samples_per_label=1))
    assert math.isinf(ledger.budget().spent)  # a non-private model leaves its patients no guarantee
    with pytest.raises(PrivacyPolicy, match="WITHOUT differential privacy was trained from this store"):
        train_model(config("d", 1.0))


def test_runs_starting_together_cannot_both_pass_a_budget_only_one_fits(demo_store, tmp_path: Path) -> None:
    """The budget check and the reservation are one step under the store's lock: eight runs that start at the same
    moment, each fitting the budget alone and no two together, admit exactly one."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    ledger = CohortStore.open(_store_copy(demo_store, tmp_path, budget=10.0)).ledger()
    release = [(6.0, 0.5, 300)]  # ε ≈ 7 alone: one fits, two (≈ 10.4, with the count) do not
    assert ledger.projected("x", release) < 10 < ledger.projected("x", release * 2)
    start = Barrier(8)

    def reserve(run: int) -> bool:
        start.wait(timeout=60)
        try:
            ledger.reserve(f"run-{run}", release, accountant="prv", allow_over_budget=False, status="reserved")
        except PrivacyPolicy:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(reserve, range(8)))
    assert sum(admitted) == 1
    assert [e["status"] for e in ledger.entries()] == ["released", "reserved"]


@pytest.mark.slow
def test_noise_multiplicity_and_no_dp_card(demo_store, tmp_path: Path) -> None:
    card = train_model(
        TrainConfig(
            store=demo_store.store.path,
            out=tmp_path / "k",
            preset=tiny_preset(noise_multiplicity=3, timestep_sampling="logit-normal", timestep_mean=0.5),
            epsilon=8.0,
            max_steps=2,
            samples_per_label=1,
        )
    ).card.to_json()
    assert card["noise_multiplicity"] == 3 and card["steps"] == 2 and card["stopped_early"]
    assert card["preset"]["timestep_sampling"] == "logit-normal" and card["preset"]["timestep_mean"] == 0.5
    assert "logit-normal timesteps, focus z ~ N(0.5, 1)" in card["sampling"]
    assert card["epsilon"] < 8.0  # stopping early spends less than the target
    plain = train_model(
        TrainConfig(
            store=_store_copy(demo_store, tmp_path),  # a non-private run spends the whole budget of its store
            out=tmp_path / "p",
            preset=tiny_preset(),
            dp=False,
            epsilon=None,
            max_steps=2,
            samples_per_label=1,
        )
    ).card.to_json()
    assert plain["dp"] is False and plain["epsilon"] is None and "NOT PRIVATE" in plain["statement"]
    with pytest.raises(PrivacyPolicy):
        ensure_private_ok(ModelCard.parse(plain), allow_not_private=False)
    ensure_private_ok(ModelCard.parse(plain), allow_not_private=True)


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.mark.slow
def test_ctrl_c_on_the_cli_leaves_a_private_checkpoint_and_resumes(demo_store, tmp_path: Path) -> None:
    """The CLI half of resuming (exactness is tested above): Ctrl-C → exit 130, a 0600 checkpoint, no card."""
    store = str(demo_store.store.path)
    flags = ["--epsilon", "8", "--batch-size", "8", "--physical-batch-size", "4", "--epochs", "16"]  # 24 steps
    flags += ["--seed", "1", "--public-prior", "none", "--max-grad-norm", "0.5"]
    env = {**os.environ, "SYNTHCOHORT_NUM_THREADS": "1"}
    interrupted = cli("train", store, "--out", str(tmp_path / "b"), *flags, env=env)
    checkpoint = tmp_path / "b" / "private" / "checkpoint.pt"
    deadline = time.time() + 300
    while not (tmp_path / "b" / "private").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the SIGINT handler is installed before the private directory is created
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, err
    assert "checkpoint saved" in out and checkpoint.is_file()
    assert checkpoint.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "b" / "model_card.json").exists()
    resumed = cli("train", store, "--out", str(tmp_path / "b"), *flags, "--resume", env=env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    card = json.loads((tmp_path / "b" / "model_card.json").read_text())
    assert card["steps"] == card["planned_steps"] and "ε=" in out
    assert card["max_grad_norm"] == 0.5  # the clipping norm given on the command line is the one trained with


@pytest.mark.slow
def test_cli_refuses_non_private_without_confirmation(demo_store, tmp_path: Path) -> None:
    store = str(demo_store.store.path)
    refused = cli("train", store, "--out", str(tmp_path / "x"), "--no-dp")
    refused.wait(timeout=120)
    assert refused.returncode == 5 and "--i-understand-not-private" in refused.stderr.read()
    missing = cli("train", store, "--out", str(tmp_path / "x"))
    missing.wait(timeout=120)
    assert missing.returncode == 2 and "--epsilon" in missing.stderr.read()
    budget = cli("privacy-budget", "--patients", "800", "--batch-size", "256", "--epochs", "100", "--epsilon", "8")
    out, _ = budget.communicate(timeout=120)
    assert budget.returncode == 0 and "steps = 312" in out and "noise multiplier" in out
    assert "DP patient count included" in out
    np.testing.assert_allclose(float(out.split("σ = ")[1].split()[0]), 3.5, atol=0.1)
