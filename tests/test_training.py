"""Patient-level DP training: exact per-patient gradients, accounting, the loop, checkpoints and the card."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from safetensors.torch import load_file

from generators.bundle import DiffusionModel
from generators.diffusion import noise_schedule, training_scheduler
from generators.errors import InvalidInput, PrivacyPolicy
from generators.unet import UNetSize, build_unet, use_plain_attention
from train.accounting import default_delta, epsilon_spent, plan_privacy
from train.dp_training import TrainConfig, ensure_private_ok, train_model
from train.per_patient_grads import brute_force_per_patient_grads, make_per_patient_grad_fn
from train.presets import PRESETS, get_preset

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


@pytest.mark.parametrize(("prediction", "channels_last"), [("sample", True), ("v_prediction", False)])
def test_per_patient_gradients_are_exact_on_the_shipped_architecture(prediction: str, channels_last: bool) -> None:
    """torch.func per-patient gradients == one backward pass per patient, for the cpu-small UNet (with attention).

    Run at 16 px to keep the test fast: same blocks, layers and attention as the shipped 32 px model.
    """
    torch.manual_seed(0)
    preset = PRESETS["cpu-small"]
    model = build_unet(image_size=16, n_classes=2, size=preset.unet)
    use_plain_attention(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    alphas = noise_schedule(training_scheduler(prediction))
    images, labels, timesteps, noise = random_draws(3, 2, 16, 2)  # 3 patients, K = 2 draws
    fn = make_per_patient_grad_fn(model, alphas, prediction)
    grads, losses = fn({n: p.detach() for n, p in model.named_parameters()}, images, labels, timesteps, noise)
    reference = brute_force_per_patient_grads(model, alphas, prediction, images, labels, timesteps, noise)
    assert losses.shape == (3,)
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-6, msg=name)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    ref_norms = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-7)
    assert torch.all(ref_norms > 0)


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
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)


def test_privacy_plan_spends_the_target() -> None:
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, n_patients=800, expected_batch_size=256, epochs=100)
    assert plan.sample_rate == pytest.approx(0.32) and plan.steps == 312
    spent = epsilon_spent(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=1e-5,
        accountant="prv",
    )
    assert 7.8 <= spent <= 8.0 + 1e-6
    half = epsilon_spent(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps // 2,
        delta=1e-5,
        accountant="prv",
    )
    assert half < spent  # fewer steps spend less
    rdp = plan_privacy(
        target_epsilon=8.0, delta=1e-5, n_patients=800, expected_batch_size=256, epochs=100, accountant="rdp"
    )
    assert rdp.noise_multiplier > plan.noise_multiplier  # PRV is the tighter accountant
    looser = plan_privacy(target_epsilon=2.0, delta=1e-5, n_patients=800, expected_batch_size=256, epochs=100)
    assert looser.noise_multiplier > plan.noise_multiplier
    assert epsilon_spent(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, accountant="rdp") == 0.0


def test_default_delta_and_bad_plans() -> None:
    for n in (10, 800, 5000, 200_000):
        assert default_delta(n) <= 0.1 / n and default_delta(n) <= 1e-5
    with pytest.raises(InvalidInput, match="delta"):
        plan_privacy(target_epsilon=8, delta=0.01, n_patients=800, expected_batch_size=10, epochs=1)
    with pytest.raises(InvalidInput, match="epsilon"):
        plan_privacy(target_epsilon=0, delta=1e-5, n_patients=800, expected_batch_size=10, epochs=1)
    with pytest.raises(InvalidInput, match="batch size"):
        plan_privacy(target_epsilon=1, delta=1e-5, n_patients=80, expected_batch_size=100, epochs=1)
    with pytest.raises(InvalidInput, match="preset"):
        get_preset("tpu-huge")


def test_training_writes_a_complete_bundle(demo_store, tmp_path: Path) -> None:
    out = tmp_path / "model"
    seen: list[dict] = []
    config = TrainConfig(store=demo_store.store.path, out=out, preset=tiny_preset(), epsilon=8.0, samples_per_label=2)
    result = train_model(config, progress=seen.append)
    card = result.card
    assert [s["step"] for s in seen if s["phase"] == "public prior"] == [1, 2]
    assert [s["step"] for s in seen if s["phase"] == "dp"] == list(range(1, card["steps"] + 1))
    assert card["public_pretraining"]["steps"] == 2 and "no ε" in card["public_pretraining"]["privacy"]
    for key in (
        "labels",
        "image_size",
        "voxel_spacing_mm",
        "dp",
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "epochs",
        "noise_multiplicity",
        "privacy_unit",
        "n_train_patients",
        "n_train_slices",
        "target_epsilon_met",
        "training_wall_time_s",
        "library_versions",
        "store_fingerprint",
    ):
        assert key in card, key
    assert card["dp"] is True and card["privacy_unit"] == "patient"
    assert card["epsilon"] <= 8.0 * 1.01 and card["target_epsilon_met"]
    assert card["delta"] < 1 / card["n_train_patients"]
    assert card["n_train_patients"] == 12 and card["labels"] == {"healthy": 0, "lesion": 1}
    assert card["store_fingerprint"] == demo_store.store.fingerprint
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "model_card.json", "scheduler", "private"} <= names
    assert {"samples_healthy.png", "samples_lesion.png"} <= names
    assert json.loads((out / "model_card.json").read_text()) == card

    model = DiffusionModel.load(out, device="cpu")
    a = model.generate(labels={"healthy": 2, "lesion": 1}, seed=5, steps=4)
    b = model.generate(labels={"healthy": 2, "lesion": 1}, seed=5, steps=4)
    c = model.generate(labels=["healthy"], seed=6, steps=4)
    assert a.images.shape == (3, 1, 16, 16) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= -1 and float(a.images.max()) <= 1
    assert torch.equal(a.images, b.images) and a.labels == ["healthy", "healthy", "lesion"]
    assert list(a.seeds) == [5, 6, 7]
    assert torch.equal(c.images[0], a.images[1])  # a sample is reproducible from its own seed
    with pytest.raises(InvalidInput, match="valid labels are"):
        model.generate(labels={"tumour": 1}, seed=0)
    with pytest.raises(InvalidInput, match="non-negative"):
        model.generate(labels={"healthy": -1}, seed=0)
    with pytest.raises(InvalidInput, match="at most"):
        model.generate(labels={"healthy": 10**6}, seed=0)

    again = train_model(config)
    assert again.reused  # unchanged inputs: the bundle is reused, not retrained


def test_empty_poisson_batches_still_step_and_count(demo_store, tmp_path: Path) -> None:
    seen: list[dict] = []
    preset = tiny_preset(batch_size=1, epochs=1.0)  # q = 1/12: about a third of the steps sample nobody
    config = TrainConfig(
        store=demo_store.store.path, out=tmp_path / "m", preset=preset, epsilon=50.0, samples_per_label=1
    )
    card = train_model(config, progress=seen.append).card
    seen = [s for s in seen if s["phase"] == "dp"]
    assert any(s["patients"] == 0 for s in seen), "no empty batch drawn; pick another seed"
    assert card["steps"] == len(seen) == 12
    expected = epsilon_spent(
        noise_multiplier=card["noise_multiplier"],
        sample_rate=card["sample_rate"],
        steps=12,
        delta=card["delta"],
        accountant="prv",
    )
    assert card["epsilon"] == pytest.approx(expected)  # the accountant counted every step, empty ones included


def test_noise_multiplicity_and_no_dp_card(demo_store, tmp_path: Path) -> None:
    card = train_model(
        TrainConfig(
            store=demo_store.store.path,
            out=tmp_path / "k",
            preset=tiny_preset(noise_multiplicity=3),
            epsilon=8.0,
            max_steps=2,
            samples_per_label=1,
        )
    ).card
    assert card["noise_multiplicity"] == 3 and card["steps"] == 2 and card["stopped_early"]
    assert card["epsilon"] < 8.0  # stopping early spends less than the target
    plain = train_model(
        TrainConfig(
            store=demo_store.store.path,
            out=tmp_path / "p",
            preset=tiny_preset(),
            dp=False,
            epsilon=None,
            max_steps=2,
            samples_per_label=1,
        )
    ).card
    assert plain["dp"] is False and plain["epsilon"] is None and "NOT PRIVATE" in plain["statement"]
    with pytest.raises(PrivacyPolicy):
        ensure_private_ok(plain, allow_not_private=False)
    ensure_private_ok(plain, allow_not_private=True)


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_ctrl_c_leaves_a_checkpoint_and_resume_is_exact(demo_store, tmp_path: Path) -> None:
    store = str(demo_store.store.path)
    flags = [
        "--epsilon",
        "8",
        "--batch-size",
        "8",
        "--physical-batch-size",
        "4",
        "--epochs",
        "40",
        "--seed",
        "1",
        "--public-prior",
        "none",
    ]
    env = {**os.environ, "SYNTHCOHORT_NUM_THREADS": "1"}

    straight = cli("train", store, "--out", str(tmp_path / "a"), *flags, env=env)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

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
    assert not (tmp_path / "b" / "model_card.json").exists()

    resumed = cli("train", store, "--out", str(tmp_path / "b"), *flags, "--resume", env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card_a = json.loads((tmp_path / "a" / "model_card.json").read_text())
    card_b = json.loads((tmp_path / "b" / "model_card.json").read_text())
    assert card_a["epsilon"] == card_b["epsilon"] and card_a["steps"] == card_b["steps"]


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
    np.testing.assert_allclose(float(out.split("σ = ")[1].split()[0]), 3.5, atol=0.1)
