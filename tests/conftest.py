"""Shared fixtures: a small real demo cohort and its store, built once per test session."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock

from generators.card import ModelCard
from train.demo_cohort import DemoPatient, make_demo_cohort
from train.ingest import IngestOptions, IngestResult, ingest
from train.store import CohortStore

# `make test` runs the suite in two processes (pytest -n 2, pytest-xdist): each takes its share of the cores, for
# torch in the process and for the commands it starts, instead of every process taking all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("SYNTHCOHORT_NUM_THREADS", str(_share))
    import torch

    torch.set_num_threads(_share)

# ------------------------------------------------------------------------------------------------ test lanes
# `make test-fast` runs what needs no trained model, server, browser or PostgreSQL: `-m "not slow"`. Lanes come from
# what a test uses, so a new test lands in the right one without anyone remembering to mark it: a fixture below
# makes it slow, the PostgreSQL half of a service test is also `postgres`, a Chromium test is also `browser`.
# Tests that train or start servers without such a fixture carry `@pytest.mark.slow` themselves.
SLOW_FIXTURES = frozenset(
    {"canary_store", "unseen_store", "tiny_model", "covariate_model", "volume_store", "split_holdout", "db_url"}
)
SLOW_MODULES = frozenset(
    {"test_api", "test_workers", "test_web_ui", "test_pipeline", "test_audit", "test_volumes", "test_deface"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        if (callspec is not None and callspec.params.get("backend") == "postgresql") or "postgres" in item.name:
            item.add_marker(pytest.mark.postgres)
        if "chromium" in item.name:
            item.add_marker(pytest.mark.browser)


DEMO_LABELS = ("healthy", "lesion")


def ingest_options(labels: tuple[str, ...] = DEMO_LABELS, **fields) -> IngestOptions:
    """Ingest options for the tests' small cohorts: ``labels`` declared, and any number of patients per label
    accepted (the default minimum of 20 is tested on its own)."""
    return IngestOptions(labels=tuple(labels), **{"min_label_patients": 1, **fields})


def tiny_card(*, image_size: int = 16, labels: tuple[str, ...] = ("healthy", "lesion"), **fields) -> ModelCard:
    """A valid card for a model built in a test (not trained by ``train_model``): not private unless told."""
    base = {
        "created": "2026-11-22",
        "generator": "diffusion-2d",
        "spatial_dims": 2,
        "labels": {name: i for i, name in enumerate(labels)},
        "image_size": image_size,
        "voxel_spacing_mm": [1.0, 1.0, 1.0],
        "dp": False,
    }
    return ModelCard.parse({**base, **fields})


# --------------------------------------------------------------------------- service databases
# The service tests run twice: on SQLite (the embedded default) and on the local PostgreSQL server, each test
# or module in a database of its own that the run creates and drops. SYNTHCOHORT_TEST_POSTGRES_URL names the
# server's maintenance database; where none answers, the PostgreSQL half is skipped with one reason.
POSTGRES_ADMIN_URL = os.environ.get(
    "SYNTHCOHORT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ("sqlite", "postgresql")


@functools.cache
def _postgres_reachable() -> str:  # "" or why not (asked once per test run)
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except Exception as exc:  # any failure to connect means: no PostgreSQL here
        return f"PostgreSQL not reachable ({type(exc).__name__}): PostgreSQL half of the service tests skipped"
    finally:
        engine.dispose()
    return ""


def _postgres_admin():  # an autocommit engine on the maintenance database, or the reason there is none
    from sqlalchemy import create_engine

    reason = _postgres_reachable()
    if reason:
        return None, reason
    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}), ""


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """A new, empty database at the current schema; its URL. PostgreSQL databases are dropped afterwards."""
    from sqlalchemy import text

    from app.db import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{directory / f'service-{uuid.uuid4().hex[:8]}.db'}"
        upgrade(url)
        yield url
        return
    admin, reason = _postgres_admin()
    if admin is None:
        pytest.skip(reason)
    name = f"synthcohort_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        from app.db import engine_for

        engine_for.cache_clear()  # this process's pools let go of the database before it is dropped
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """Each service test module runs once per database backend (PostgreSQL: skipped here, with one reason, where
    no server answers)."""
    if request.param == "postgresql":
        admin, reason = _postgres_admin()
        if admin is None:
            pytest.skip(reason)
        admin.dispose()
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own."""
    with fresh_database(backend, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DemoPatient]]:
    """16 demo patients, half of them also as DICOM (single- and multi-frame)."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    plan = make_demo_cohort(out, patients=16, seed=3, workers=1, dicom_fraction=0.5)
    return out, plan


def pin_patient_estimate(store_path: Path, value: int) -> None:
    """Tests only: replace a store's DP patient estimate N̂ (drawn from OS entropy) with a known value, so that
    q = B / N̂ and step counts are deterministic."""
    meta_path = store_path / "store.json"
    meta = json.loads(meta_path.read_text())
    meta["patients_estimate"]["value"] = value
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def demo_store(demo_raw, tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """The 16-patient store many training tests share: N̂ pinned to the 12 training patients, and a privacy
    budget large enough for all of them."""
    raw, _ = demo_raw
    out = tmp_path_factory.mktemp("store") / "store"
    options = ingest_options(size=32, slices=4, holdout=0.25, store_budget=1e6)
    result = ingest(raw, out, labels_path=raw / "labels.csv", options=options)
    pin_patient_estimate(out, 12)
    return IngestResult(store=CohortStore.open(out), report=result.report, skipped=result.skipped)


# ------------------------------------------------------------------ built once per version of the code
# The canary store and the tiny model take minutes to build; they are kept in pytest's cache under a key made of
# the source they depend on (every module of generators/, train/ and privacy_filters/, app/calibrate.py, and this
# file), and each test session works on its own copy. A change to any of that code rebuilds them; a clean clone
# builds once.
SOURCES = ("generators", "train", "privacy_filters", "app/calibrate.py")


@functools.cache
def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for source in SOURCES:
        for path in sorted((root / source).rglob("*.py")) if (root / source).is_dir() else [root / source]:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_build(config: pytest.Config, name: str, build: Callable[[Path], None], tmp: Path) -> Path:
    """``build(dir)`` once per code version (kept in pytest's cache); returns this session's copy of ``dir``."""
    cache = config.cache.mkdir(f"synthcohort-{name}") if config.cache is not None else tmp / "nocache"
    cache.mkdir(parents=True, exist_ok=True)
    kept = cache / code_version()
    with FileLock(str(cache) + ".lock"):  # parallel test processes (pytest -n) build once and share the build
        if not kept.is_dir():
            for old in cache.iterdir():  # other versions' builds
                shutil.rmtree(old, ignore_errors=True)
            work = Path(tempfile.mkdtemp(dir=cache.parent))
            build(work)
            os.replace(work, kept)
    copy = tmp / name
    shutil.copytree(kept, copy)
    return copy


@pytest.fixture(scope="session")
def canary_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """A larger demo store (200 patients, 64 px, 4 slices each, 30 % held out) for filter calibration; its raw
    cohort lies beside it (``store.path.parent / "raw"``)."""

    def build(root: Path) -> None:
        make_demo_cohort(root / "raw", patients=200, seed=7, workers=2, dicom_fraction=0.0)
        options = ingest_options(size=64, slices=4, holdout=0.3, workers=2)
        ingest(root / "raw", root / "store", labels_path=root / "raw" / "labels.csv", options=options)

    root = cached_build(request.config, "canary", build, tmp_path_factory.mktemp("canary"))
    store = CohortStore.open(root / "store")
    return IngestResult(store=store, report=store.report, skipped=[])


@pytest.fixture(scope="session")
def unseen_store(tmp_path_factory: pytest.TempPathFactory) -> IngestResult:
    """60 new patients from another seed: real patients no filter or model has ever seen."""
    root = tmp_path_factory.mktemp("unseen")
    make_demo_cohort(root / "raw", patients=60, seed=8, workers=2, dicom_fraction=0.0)
    options = ingest_options(size=64, slices=4, holdout=0.0, workers=2)
    return ingest(root / "raw", root / "store", labels_path=root / "raw" / "labels.csv", options=options)


@pytest.fixture(scope="session")
def tiny_model(canary_store, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real DP model (16 px, a few steps) trained on the canary store (60 held-out patients, enough to
    calibrate a filter), with its calibrated filter."""
    from app.calibrate import calibrate
    from generators.unet import UNetSize
    from train.dp_training import TrainConfig, train_model
    from train.presets import get_preset

    preset = get_preset(
        "cpu-small",
        image_size=16,
        unet=UNetSize(block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4),
        batch_size=8,
        physical_batch_size=8,
        epochs=1,
        public_pretrain_steps=20,
        public_batch_size=16,
    )

    def build(root: Path) -> None:
        out = root / "tiny"
        train_model(
            TrainConfig(store=canary_store.store.path, out=out, preset=preset, epsilon=8.0, samples_per_label=2)
        )
        calibrate(canary_store.store.path, root / "tiny")

    key = f"tiny-{canary_store.store.store_id[:12]}"  # the model belongs to this very store
    return cached_build(request.config, key, build, tmp_path_factory.mktemp("models")) / "tiny"
