"""The generator interface: the typed card, the bundle layout, the registry, and a new kind end to end."""

import json
import shutil
from pathlib import Path
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_card
from torch._dynamo.utils import counters

from app.pipeline import CohortRequest, build_cohort
from generators.base import Generated, Generator, expand_labels
from generators.card import CARD_FORMAT, ModelCard, read_card, write_card
from generators.diffusion_2d import DiffusionModel
from generators.errors import InvalidInput, NotFound
from generators.layout import BundleLayout
from generators.registry import GENERATORS, load_generator, register


def test_trained_card_round_trips_and_names_its_generator(tiny_model: Path) -> None:
    on_disk = json.loads(BundleLayout(tiny_model).card.read_text())
    card = read_card(tiny_model)
    assert card.to_json() == on_disk
    assert on_disk["format"] == CARD_FORMAT and card.generator == "diffusion-2d" and card.spatial_dims == 2
    assert card.image_shape == (16, 16) and card.dp and card.epsilon is not None
    model = load_generator(tiny_model, device="cpu")
    assert isinstance(model, DiffusionModel) and isinstance(model, Generator)
    assert model.image_shape == (16, 16) and model.label_ids == {"healthy": 0, "lesion": 1}


def test_bundle_layout_is_where_training_writes(tiny_model: Path) -> None:
    layout = BundleLayout(tiny_model)
    for path in (layout.card, layout.training_record, layout.calibration, layout.seed_key, layout.filter_dir):
        assert path.exists(), path.name
    assert layout.private.stat().st_mode & 0o777 == 0o700
    assert all(layout.sample_grid(label).is_file() for label in ("healthy", "lesion"))


def test_format_2_cards_read_as_2d_diffusion(tiny_model: Path, tmp_path: Path) -> None:
    old = json.loads(BundleLayout(tiny_model).card.read_text())
    old["format"] = 2
    del old["generator"], old["spatial_dims"]
    card = ModelCard.parse(old)
    assert (card.format, card.generator, card.spatial_dims) == (CARD_FORMAT, "diffusion-2d", 2)
    bundle = tmp_path / "old"
    shutil.copytree(tiny_model, bundle)
    BundleLayout(bundle).card.write_text(json.dumps(old))
    assert load_generator(bundle, device="cpu").card == card


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 1}, "published exact private counts"),
        ({"format": 4}, "newer synthcohort"),
        ({"exact_patients": 812}, "Extra inputs are not permitted"),
        ({"dp": True, "epsilon": None}, "must state epsilon"),
        ({"labels": {"a": 0, "b": 0}}, "distinct id"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"image_size": "big"}, "image_size"),
    ],
)
def test_bad_cards_are_refused_with_the_reason(change: dict, message: str) -> None:
    card = tiny_card(dp=True, epsilon=8.0, delta=1e-5, accountant="prv").to_json()
    with pytest.raises(InvalidInput, match=message):
        ModelCard.parse({**card, **change})


def test_missing_or_unreadable_card(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no model bundle"):
        read_card(tmp_path)
    BundleLayout(tmp_path).card.write_text("{not json")
    with pytest.raises(InvalidInput, match="unreadable"):
        read_card(tmp_path)
    write_card(tmp_path, tiny_card(generator="no-such-kind"))
    with pytest.raises(InvalidInput, match="unknown generator kind 'no-such-kind'"):
        load_generator(tmp_path)


def test_sampling_options_come_from_the_card_and_refuse_unknown_ones(tiny_model: Path) -> None:
    model = load_generator(tiny_model, device="cpu")
    defaults = model.sampling_options()
    assert defaults == {**defaults, **read_card(tiny_model).sampler}
    assert model.sampling_options(steps=5, guidance=None)["steps"] == 5
    assert model.sampling_options(guidance=None)["guidance"] == defaults["guidance"]
    with pytest.raises(InvalidInput, match="unknown sampling option"):
        model.sampling_options(temperature=0.7)


def test_sampling_with_the_network_in_bf16_stays_near_fp32_and_refuses_unknown_precisions(tiny_model: Path) -> None:
    """bf16 autocast engages (the samples change) while the fp32 solver keeps them near the fp32 samples of the
    same seeds; the images come back fp32 either way."""
    model = load_generator(tiny_model, device="cpu")
    options = {"labels": {"healthy": 2, "lesion": 2}, "seed": 3, "steps": 4}
    fp32 = model.generate(**options).images
    bf16 = model.generate(**options, precision="bf16").images
    assert bf16.dtype == torch.float32
    rmse = float(((bf16 - fp32) ** 2).mean().sqrt())
    assert 0.0 < rmse < 0.05, rmse
    with pytest.raises(InvalidInput, match="unknown precision"):
        model.generate(**options, precision="fp8")


def test_compiled_sampling_gives_the_eager_samples(tiny_model: Path) -> None:
    """``generate(compile=...)``: the network traced by torch.compile (here the aot_eager backend: inductor's CPU
    code takes a minute to build; on a GPU it replays CUDA graphs) gives the eager samples over two batch shapes
    (a graph each), compiled once per model and backend; an unknown backend is refused."""
    model = load_generator(tiny_model, device="cpu")
    options = {"labels": {"healthy": 3, "lesion": 2}, "seed": 5, "steps": 3, "batch_size": 3}  # batches of 3 and 2
    traced = counters["stats"]["unique_graphs"]
    compiled = model.generate(**options, compile="aot_eager").images
    assert counters["stats"]["unique_graphs"] == traced + 2  # Dynamo traced the network, once per batch shape
    torch.testing.assert_close(compiled, model.generate(**options).images, rtol=0, atol=1e-6)
    assert model.denoiser("aot_eager") is model.denoiser("aot_eager") is not model.predict
    with pytest.raises(InvalidInput, match=r"unknown torch\.compile backend"):
        model.generate(**options, compile="no-such-backend")


class ShiftedNoise:
    """A second generator kind, defined here only: Gaussian noise whose mean is the label id (no weights)."""

    kind: ClassVar[str] = "test-shifted-noise"

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    @property
    def label_ids(self) -> dict[str, int]:
        return dict(self.card.labels)

    @property
    def spatial_dims(self) -> int:
        return self.card.spatial_dims

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.card.image_shape

    @classmethod
    def load(cls, model_dir, device: str = "auto") -> "ShiftedNoise":
        return cls(read_card(model_dir))

    def save(self, model_dir, card: ModelCard | None = None) -> None:
        write_card(model_dir, card or self.card)

    def sampling_options(self, **requested) -> dict:
        return {k: v for k, v in requested.items() if v is not None and k == "scale"}

    def generate(self, *, labels, seed, seeds=None, progress=None, scale: float = 0.3, **options) -> Generated:
        names = expand_labels(labels, self.label_ids)
        seeds = np.asarray(seeds if seeds is not None else [seed + i for i in range(len(names))], dtype=np.int64)
        images = torch.stack(
            [
                (torch.randn(1, *self.image_shape, generator=torch.Generator().manual_seed(int(s))) * scale)
                + 0.2 * self.label_ids[name]
                for name, s in zip(names, seeds, strict=True)
            ]
        ).clamp(-1, 1)
        return Generated(images=images, labels=names, seeds=seeds)

    def membership_losses(self, images, labels, *, timesteps, seed) -> np.ndarray:
        return np.zeros((len(timesteps), len(images)))


def test_a_new_generator_kind_needs_only_its_class_and_registration(tiny_model: Path, tmp_path: Path) -> None:
    """The release pipeline, its filter and its writers run a generator they have never heard of."""
    register(ShiftedNoise)
    try:
        bundle = tmp_path / "noise"
        shutil.copytree(tiny_model, bundle)  # its calibrated filter and seed key; the UNet files are ignored
        card = read_card(tiny_model).model_copy(update={"generator": ShiftedNoise.kind})
        ShiftedNoise(card).save(bundle)
        assert isinstance(load_generator(bundle), ShiftedNoise)

        out = tmp_path / "cohort"
        manifest = build_cohort(bundle, CohortRequest(counts={"healthy": 3, "lesion": 2}, seed=4), out, device="cpu")
        assert manifest["dataset"]["generator"] == ShiftedNoise.kind and len(manifest["samples"]) == 5
        lesion = next(s for s in manifest["samples"] if s["label"] == "lesion")
        pixels = np.asarray(nib.load(out / lesion["file"]).dataobj)[:, :, 0]
        again = ShiftedNoise(card).generate(labels=["lesion"], seed=0, seeds=[lesion["seed"]])
        np.testing.assert_allclose(pixels, again.images[0, 0].numpy()[::-1, :].T, atol=1e-6)
    finally:
        GENERATORS.pop(ShiftedNoise.kind, None)


def test_the_service_skips_a_bundle_whose_card_is_invalid(tiny_model: Path, tmp_path: Path) -> None:
    from app.model_registry import ModelRegistry

    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "good")
    shutil.copytree(tiny_model, models / "tampered")
    card = json.loads(BundleLayout(models / "tampered").card.read_text())
    BundleLayout(models / "tampered").card.write_text(json.dumps({**card, "n_train_patients": 812}))
    registry = ModelRegistry(models)
    assert list(registry.models) == ["good"]
    public = registry.get("good").public()
    assert public["generator"] == "diffusion-2d" and public["image_shape"] == [16, 16] and public["private"]


# ------------------------------------------------------------------------------------------------ 3-D
def tiny_3d_size():
    from generators.unet import UNet3DSize

    return UNet3DSize(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=4)


def untrained_3d(n_classes: int = 2):
    """A tiny 3-D UNet whose zero-initialised output layers (MONAI's default) get small random weights, so every
    block receives a gradient and samples differ by seed."""
    from generators.diffusion_3d import build_unet_3d

    network = build_unet_3d(n_classes=n_classes, size=tiny_3d_size())
    with torch.no_grad():
        for parameter in network.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0.0, 0.05)
    return network


def test_per_patient_gradients_are_exact_on_the_3d_blocks() -> None:
    """vmap'd per-patient gradients through MONAI's 3-D UNet (convolutions, attention, class embedding) equal one
    ordinary backward pass per patient, with K draws averaged per patient."""
    from generators.diffusion import noise_schedule, training_scheduler
    from train.per_patient_grads import brute_force_per_patient_grads, make_per_patient_grad_fn

    torch.manual_seed(0)
    model = untrained_3d()
    alphas = noise_schedule(training_scheduler("sample"))
    b, k = 3, 2
    images = (torch.rand(b, 1, 1, 8, 8, 8) * 2 - 1).expand(b, k, 1, 8, 8, 8).contiguous()
    labels = torch.tensor([[0, 2], [1, 1], [2, 0]])
    timesteps = torch.randint(0, 1000, (b, k))
    noise = torch.randn(b, k, 1, 8, 8, 8)
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads, losses = make_per_patient_grad_fn(model, alphas, "sample")(params, images, labels, timesteps, noise)
    reference = brute_force_per_patient_grads(model, alphas, "sample", images, labels, timesteps, noise)
    assert losses.shape == (b,)
    assert reference["class_embedding.weight"].abs().sum() > 0 and reference["out.2.conv.weight"].abs().sum() > 0
    total = torch.cat([g.flatten(1) for g in reference.values()], 1).norm(dim=1)  # (B,)
    for name, expected in reference.items():
        error = (grads[name] - expected).flatten(1).norm(dim=1)
        scale = torch.maximum(expected.flatten(1).norm(dim=1), 1e-3 * total)  # key biases: 0 in exact arithmetic
        assert (error / scale).max() < 1e-4, name


def test_a_3d_model_saves_loads_and_generates_reproducible_volumes(canary_store, tmp_path: Path) -> None:
    from app.calibrate import calibrate
    from generators.diffusion import training_scheduler
    from generators.diffusion_3d import Diffusion3DModel

    card = tiny_card(image_size=8, generator="diffusion-3d", spatial_dims=3)
    torch.manual_seed(0)
    model = Diffusion3DModel(untrained_3d(), tiny_3d_size(), training_scheduler("sample").config, card)
    model.save(tmp_path)
    loaded = load_generator(tmp_path, device="cpu")
    assert isinstance(loaded, Diffusion3DModel) and isinstance(loaded, Generator)
    assert loaded.image_shape == (8, 8, 8) and loaded.spatial_dims == 3
    options = loaded.sampling_options(steps=3)
    first = loaded.generate(labels={"healthy": 2, "lesion": 1}, seed=7, **options)
    again = model.generate(labels=["lesion"], seed=0, seeds=[int(first.seeds[2])], **options)
    assert first.images.shape == (3, 1, 8, 8, 8) and first.images.abs().max() <= 1.0
    torch.testing.assert_close(first.images[2:], again.images)  # the saved weights and the seed decide the pixels
    assert not torch.equal(first.images[0], first.images[1])
    losses = loaded.membership_losses(first.images.numpy(), np.array([0, 0, 1]), timesteps=(10, 500), seed=0)
    assert losses.shape == (2, 3) and np.isfinite(losses).all()
    with pytest.raises(NotFound, match="no memorization filter"):  # nothing leaves without the filter
        build_cohort(
            tmp_path, CohortRequest(counts={"healthy": 1}, allow_not_private=True), tmp_path / "cohort", device="cpu"
        )
    assert not (tmp_path / "cohort").exists()
    with pytest.raises(InvalidInput, match="not trained on this store of 2-D items"):
        calibrate(canary_store.store.path, tmp_path)
    assert not BundleLayout(tmp_path).private.exists()
    with pytest.raises(InvalidInput, match="cannot load as diffusion-3d"):
        Diffusion3DModel(untrained_3d(), tiny_3d_size(), {}, tiny_card())
