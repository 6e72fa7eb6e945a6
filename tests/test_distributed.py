"""DP training across processes (train.distributed): exact steps on gloo, a killed rank, resume, bad launches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from generators.diffusion import noise_schedule, training_scheduler
from generators.unet import UNetSize, build_unet, use_plain_attention
from train.accounting import plan_privacy
from train.distributed import Launch, World
from train.dp_training import make_dp_optimizer
from train.per_patient_grads import make_per_patient_grad_fn

TINY = UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4)
PATIENTS, CLIP = 6, 0.05
CLI = [sys.executable, "-m", "app.cli"]


def _one_step(world: World, noise: bool, noise_seed: int) -> dict[str, torch.Tensor]:
    """One DP step of SGD (lr 1) on the same 6 patients' draws; each rank handles the patients it owns."""
    torch.manual_seed(0)
    model = build_unet(image_size=16, n_classes=2, size=TINY)
    use_plain_attention(model)
    alphas = noise_schedule(training_scheduler("sample"))
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(PATIENTS, 1, 1, 16, 16, generator=gen).expand(PATIENTS, 2, 1, 16, 16).contiguous() * 2 - 1
    labels = torch.randint(0, 3, (PATIENTS, 2), generator=gen)
    timesteps = torch.randint(0, 1000, (PATIENTS, 2), generator=gen)
    draws = (images, labels, timesteps, torch.randn(PATIENTS, 2, 1, 16, 16, generator=gen))
    mine = world.owned(PATIENTS)
    params = dict(model.named_parameters())
    grads, _ = make_per_patient_grad_fn(model, alphas, "sample")(
        {n: p.detach() for n, p in params.items()}, *(t[mine] for t in draws)
    )
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=400, batch_size=8, epochs=4)
    plan = plan if noise else replace(plan, noise_multiplier=0.0)
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        plan,
        max_grad_norm=CLIP,
        generator=torch.Generator().manual_seed(noise_seed),
        world=world,
    )
    for name, p in params.items():
        p.grad_sample = grads[name]
    optimizer.step()
    return {"params": torch.cat([p.detach().flatten() for p in params.values()]), "scale": plan.expected_batch_size}


def _rank(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        steps = {noise: _one_step(World(rank, 2, rank), noise, noise_seed=100 + rank) for noise in (False, True)}
        if rank == 0:
            torch.save(steps, out)
    finally:
        dist.destroy_process_group()


def _two_processes(tmp_path: Path) -> dict[bool, dict]:
    """Rank 0's result of the step without noise and of the step with it, from one pair of gloo processes."""
    out = tmp_path / "steps.pt"
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    return torch.load(out)


def test_ranks_own_every_patient_exactly_once() -> None:
    for size in (1, 2, 3, 7):
        owned = torch.cat([World(r, size, r).owned(20) for r in range(size)])
        assert sorted(owned.tolist()) == list(range(20))


@pytest.mark.slow
def test_a_step_of_two_processes_is_the_step_of_one(tmp_path: Path) -> None:
    """Noise off: 2 gloo processes (each clipping its own patients, all-reduced) give exactly the one-process step.
    Noise on: the update deviates from it by 𝒩(0, (σC/(qN̂))²) per coordinate: the noise is added once."""
    single = _one_step(World(), noise=False, noise_seed=0)
    steps = _two_processes(tmp_path)
    torch.testing.assert_close(steps[False]["params"], single["params"], rtol=1e-5, atol=1e-7)

    noisy = steps[True]
    plan = plan_privacy(target_epsilon=8.0, delta=1e-5, patients_estimate=400, batch_size=8, epochs=4)
    deviation = noisy["params"] - single["params"]
    expected = plan.noise_multiplier * CLIP / plan.expected_batch_size
    assert deviation.std().item() == pytest.approx(expected, rel=0.05)  # once, not √2 times (two ranks' noise)
    assert abs(deviation.mean().item()) < 5 * expected / deviation.numel() ** 0.5


@pytest.mark.slow
def test_bad_launches_fail_fast_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="at least 1"):
        Launch(0).check()
    for bad in (Launch(2, nnodes=2, node_rank=1), Launch(2, nnodes=2, node_rank=2, rdzv_endpoint="h:1")):
        with pytest.raises(Exception, match=r"--rdzv-endpoint|--node-rank"):
            bad.check()
    run = subprocess.run(
        [*CLI, "train", str(tmp_path), "--out", str(tmp_path / "m"), "--epsilon", "8", "--nproc-per-node", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--nproc-per-node must be at least 1" in run.stderr
    started = time.monotonic()
    unreachable = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:9", "--rdzv-timeout", "2"]
    run = subprocess.run(
        [
            *CLI,
            "train",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--epsilon",
            "8",
            "--nproc-per-node",
            "1",
            *unreachable,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "rendezvous endpoint 127.0.0.1:9 did not answer within 2 s" in run.stderr
    assert time.monotonic() - started < 60


def _rank_pids(out: Path, rank: int) -> list[int]:
    """Training processes (torchrun workers: RANK in their environment) of rank ``rank`` writing to ``out``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and str(out).encode() in command:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_run_which_resumes_with_one_ledger_entry(demo_store, tmp_path: Path) -> None:
    """Two processes on the 2-core machine: rank 1 killed mid-run → the launcher fails with the resume hint (no
    hang); `--resume` with two processes finishes; the ledger holds one run and the card says 2 processes."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(demo_store.store.path, store)
    ledger = store / "privacy_ledger.jsonl"
    earlier = len(ledger.read_text().splitlines())  # the shared store's ledger holds other tests' runs
    out = tmp_path / "model"
    command = [*CLI, "train", str(store), "--out", str(out), "--epsilon", "8", "--preset", "cpu-small"]
    command += ["--batch-size", "4", "--physical-batch-size", "2", "--epochs", "40", "--max-steps", "20"]
    command += ["--public-pretrain-steps", "0", "--checkpoint-every", "2", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "private" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists() and launcher.poll() is None, launcher.communicate()
    victims = _rank_pids(out, 1)
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=180)  # a dead rank fails the run: no hang on a collective
    assert launcher.returncode not in (0, None)
    assert "--resume" in stderr and not (out / "model_card.json").exists()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 20 and card["dp"]
    runs = [json.loads(line) for line in ledger.read_text().splitlines()[earlier:]]
    ids = {r["release"] for r in runs}
    assert len(ids) == 1 and runs[-1]["status"] == "finished"
