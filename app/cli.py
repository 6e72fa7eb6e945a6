"""The ``synthcohort`` command line. Heavy libraries are imported inside commands so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.errors import exit_code_for
from app.settings import get_settings
from generators.errors import SynthCohortError

app = typer.Typer(
    name="synthcohort",
    help="Differentially private synthetic imaging cohorts: ingest, train, filter, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


keys_app = typer.Typer(help="Manage API keys for the REST service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(help="The service database's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _settings_with(db: str | None):
    settings = get_settings()
    return settings.model_copy(update={"db_url": db}) if db else settings


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _progress(total: int | None, desc: str, unit: str, *, quiet: bool = False):
    from tqdm import tqdm

    disable = True if quiet else None  # None: shown on a terminal only
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable, file=sys.stderr)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="Directory to create (must not exist unless --force).")],
    patients: Annotated[int, typer.Option(min=2, max=100_000, help="Number of synthetic patients.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same cohort.")] = 0,
    dicom_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share also written as DICOM.")] = 0.2,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: settings).")] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write the embedded demo cohort (MNI152-derived brains, healthy/lesion) as NIfTI + DICOM + labels.csv."""
    from train.demo_cohort import make_demo_cohort

    n_workers = workers or get_settings().workers
    with _progress(patients, "demo patients", "patient") as bar:
        plan = make_demo_cohort(
            out,
            patients=patients,
            seed=seed,
            workers=n_workers,
            dicom_fraction=dicom_fraction,
            overwrite=force,
            progress=bar.update,
        )
    n_dicom = sum(1 for p in plan if p.dicom)
    labels = {label: sum(1 for p in plan if p.label == label) for label in sorted({p.label for p in plan})}
    typer.echo(
        f"wrote {len(plan)} patients to {out}: {len(plan)} NIfTI, {n_dicom} DICOM series, labels {labels}; "
        f"labels file {out / 'labels.csv'}"
    )


@app.command()
def ingest(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="A scan file or a directory of scans.")],
    out: Annotated[Path, typer.Option("--out", help="Cohort store directory to create.")],
    labels: Annotated[
        Path | None, typer.Option(help="CSV with [scan,]patient_id,label[,age,sex] (scan: file stem or folder).")
    ] = None,
    size: Annotated[
        int, typer.Option(min=8, max=1024, help="Side of stored slices (--dims 2) or of the isotropic grid (--dims 3).")
    ] = 64,
    slices: Annotated[
        int, typer.Option(min=1, max=512, help="--dims 2: axial slices taken around each volume's centre.")
    ] = 8,
    dims: Annotated[int, typer.Option(min=2, max=3, help="2: store axial slices; 3: store whole volumes.")] = 2,
    deface: Annotated[
        bool, typer.Option(help="Remove the face of every head scan before storing it (one it cannot deface: skipped).")
    ] = False,
    keep_faces: Annotated[
        bool, typer.Option(help="--dims 3: confirm the volumes carry no face (brain-extracted, defaced, not a head).")
    ] = False,
    link_by: Annotated[
        str,
        typer.Option(
            help="How a scan finds its labels row: auto (DICOM PatientID, then folder name), patient-id, folder, stem."
        ),
    ] = "auto",
    allow_2d: Annotated[
        bool, typer.Option("--allow-2d", help="Also read single-frame US/SC images without geometry as 2-D images.")
    ] = False,
    declare_labels: Annotated[
        str,
        typer.Option(
            help="Comma-separated label set models may publish (your declaration, e.g. healthy,lesion); patients "
            "with other labels are skipped."
        ),
    ] = "",
    min_label_patients: Annotated[
        int, typer.Option(min=1, help="Refuse a declared label held by fewer patients (its holders would be exposed).")
    ] = 20,
    holdout: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.95, help="Share of patients held out per label (chosen by a keyed hash: the store's secret)."
        ),
    ] = 0.2,
    store_budget: Annotated[
        float, typer.Option(min=0.01, help="Total ε every model trained from this store may spend (composed).")
    ] = 10.0,
    allow_burned_in: Annotated[bool, typer.Option(help="Accept DICOM marked BurnedInAnnotation=YES.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: settings).")] = None,
    force: Annotated[
        bool, typer.Option(help="Replace an existing store (atomically); its privacy ledger and secret carry over.")
    ] = False,
    reset_budget: Annotated[
        bool,
        typer.Option(
            help="With --force: do NOT carry the replaced store's privacy spend over (recorded in the new ledger). "
            "Only when the new store holds other patients, or the privacy officer has agreed."
        ),
    ] = False,
    show_paths: Annotated[
        bool, typer.Option(help="Print skipped inputs' paths (paths may contain identifiers; never stored).")
    ] = False,
) -> None:
    """De-identify scans + labels into a private, patient-split cohort store."""
    from train.ingest_options import IngestOptions, check_request

    options = IngestOptions(
        size=size,
        slices=slices,
        dims=dims,
        keep_faces=keep_faces,
        deface=deface,
        link_by=link_by,
        allow_2d=allow_2d,
        holdout=holdout,
        labels=tuple(label.strip() for label in declare_labels.split(",") if label.strip()),
        min_label_patients=min_label_patients,
        allow_burned_in=allow_burned_in,
        workers=workers or get_settings().workers,
        overwrite=force,
        reset_budget=reset_budget,
        store_budget=store_budget,
    )
    check_request(options, out)  # a bad request is refused before the scan readers are imported

    from train.ingest import NothingUsable
    from train.ingest import ingest as run_ingest

    try:
        with _progress(None, "ingest", "input") as bar:
            result = run_ingest(
                input_path,
                out,
                labels_path=labels,
                options=options,
                progress=bar.update,
                on_total=lambda n: setattr(bar, "total", n),
            )
    except NothingUsable as error:
        if show_paths:
            _print_skipped(error.skipped)
        raise
    if result.skipped:
        _echo_err(f"skipped {len(result.skipped)}: {result.report['skipped_summary']} (details in ingest_report.json)")
        if show_paths:
            _print_skipped(result.skipped)
    _print_store(result.store)


def _print_skipped(skipped) -> None:
    for item in skipped:
        _echo_err(f"  {item.path or item.ref}: {item.reason}")


@app.command()
def info(store: Annotated[Path, typer.Argument(help="A cohort store directory.")]) -> None:
    """Summarise a cohort store: counts per split and label (no identifiers) and its privacy budget."""
    from train.store import CohortStore

    _print_store(CohortStore.open(store))


@app.command()
def calibrate(
    store: Annotated[Path, typer.Argument(help="The cohort store the model was trained on.")],
    model_dir: Annotated[Path, typer.Argument(help="Model bundle directory; the filter goes to MODEL_DIR/private/.")],
    quantile: Annotated[float, typer.Option(min=0.001, max=0.49, help="Held-out distance quantile q.")] = 0.05,
    embedding: Annotated[
        str | None,
        typer.Option(
            help="Views, comma-separated: near-copy (aligned re-ranking), aligned-pyramid, pixels. Default: "
            "near-copy,aligned-pyramid for slices; aligned-pyramid (3-D) for volumes."
        ),
    ] = None,
    index: Annotated[str, typer.Option(help="flat (exact), ivf, hnsw or numpy.")] = "flat",
    seed: Annotated[int, typer.Option(help="Seed of the canary self-test.")] = 0,
) -> None:
    """Build the memorization filter from the store and calibrate it on held-out patients."""
    from app.calibrate import calibrate as run_calibrate
    from generators.layout import BundleLayout

    with _progress(None, "embed training images", "image") as bar:
        record = run_calibrate(
            store,
            model_dir,
            quantile=quantile,
            embedding=embedding,
            index=index,
            seed=seed,
            progress=bar.update,
            device=get_settings().device,
        )
    typer.echo(
        f"filter: {record['n_train']} training images indexed ({record['embedding']}, {index}); "
        f"q={record['quantile']}, {record['n_holdout']} held-out images from {record['n_holdout_patients']} patients"
    )
    typer.echo(
        f"  held-out acceptance {record['holdout_acceptance_rate']:.1%} (cross-validated), canary rejection "
        f"{record['canary_rejection_rate']:.1%} "
        + ", ".join(f"{k} {v:.0%}" for k, v in record["canary_rejection_by_kind"].items())
        + f"; blends 0.8/0.2 rejected {record['blend_rejection_rate']:.1%}"
    )
    typer.echo(f"  written to {BundleLayout(model_dir).private} (private: never served)")


@app.command()
def audit(
    store: Annotated[Path, typer.Argument(help="The cohort store the model was trained on.")],
    model_dir: Annotated[Path, typer.Argument(help="Model bundle directory (calibrated).")],
    out: Annotated[Path, typer.Option("--out", help="Report directory to create (private; never served).")],
    n: Annotated[int, typer.Option("--n", min=2, max=20_000, help="Synthetic samples of EVERY label.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the audited cohort (same seeds as `export --seed`).")] = 0,
    include_neighbours: Annotated[
        bool, typer.Option(help="Add a figure of the closest samples next to their nearest TRAINING slices.")
    ] = False,
    classifier_steps: Annotated[int, typer.Option(min=1, max=100_000, help="Steps per TSTR/TRTR classifier.")] = 600,
    classifier_seeds: Annotated[int, typer.Option(min=1, max=20, help="Classifier repeats (mean ± sd).")] = 3,
    matched_tstr: Annotated[
        bool,
        typer.Option(
            help="TSTR also on a synthetic set as large as the real training set (the fair protocol); "
            "--no-matched-tstr skips that generation and reports TSTR on the n per label only."
        ),
    ] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing report directory.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: settings).")] = None,
) -> None:
    """Audit a model: TSTR/TRTR utility, fidelity, DCR, membership inference vs its (ε, δ); HTML + JSON report."""
    from app.audit import STAGES, AuditSettings, run_audit

    settings = AuditSettings(
        n=n,
        seed=seed,
        include_neighbours=include_neighbours,
        classifier_steps=classifier_steps,
        classifier_seeds=classifier_seeds,
        matched_tstr=matched_tstr,
        device=device or get_settings().device,
    )
    started = 0
    with _progress(STAGES, "audit", "stage") as bar:

        def on_stage(description: str) -> None:  # called as each stage starts
            nonlocal started
            bar.update(1 if started else 0)
            started += 1
            bar.set_description(f"audit: {description}")

        report = run_audit(store, model_dir, out, settings, force=force, progress=on_stage)
        bar.update(STAGES - bar.n)
    u, p = report.utility, report.privacy
    mi, bound = p.membership_inference, p.dp_bound
    typer.echo(f"report {out / 'report.html'} and {out / 'report.json'} ({report.timings_s['total']:.0f} s)")
    if report.cohort.pipeline_stopped:
        typer.echo(f"  FINDING: the release pipeline refused this model: {report.cohort.finding}")
    typer.echo(
        f"  utility: TSTR accuracy {u.tstr.accuracy:.3f} vs TRTR {u.trtr.accuracy:.3f} "
        f"(AUC {u.tstr.auc:.3f} vs {u.trtr.auc:.3f})"
    )
    typer.echo(
        f"  fidelity: Fréchet ratio {report.fidelity.frechet.classifier_features.ratio:.2f} "
        f"(synthetic vs real baseline); DCR share {p.dcr.share_filtered:.3f} (target ≈ 0.5); "
        f"filter catches {p.filter.catch_rate_unfiltered:.1%} of unfiltered samples"
    )
    covariates = report.covariates or {}
    if "mae_synthetic" in covariates.get("age", {}):
        age = covariates["age"]
        typer.echo(
            f"  covariates: age MAE {age['mae_synthetic']:.1f} y on synthetic (real held-out "
            f"{age['mae_real_holdout']:.1f}, constant guess {age['mae_constant_synthetic']:.1f})"
        )
    if "accuracy_synthetic" in covariates.get("sex", {}):
        sex = covariates["sex"]
        typer.echo(
            f"  covariates: sex accuracy {sex['accuracy_synthetic']:.3f} on synthetic (real held-out "
            f"{sex['accuracy_real_holdout']:.3f}, chance 0.5)"
        )
    ceiling = (
        f"(ε, δ) ceiling TPR {bound.tpr_at_low_fpr:.3f}, AUC {bound.auc:.3f}"
        if bound.private and bound.tpr_at_low_fpr is not None and bound.auc is not None
        else "NOT PRIVATE"
    )
    typer.echo(
        f"  membership inference per patient: loss attack AUC {mi.loss.auc:.3f}, "
        f"TPR@1%FPR {mi.loss.tpr_at_low_fpr:.3f}; Monte-Carlo on released samples AUC "
        f"{mi.monte_carlo.filtered.auc:.3f}; {ceiling}"
    )


@app.command()
def train(
    store: Annotated[Path, typer.Argument(help="Cohort store written by `synthcohort ingest`.")],
    out: Annotated[Path, typer.Option("--out", help="Model bundle directory.")],
    epsilon: Annotated[float | None, typer.Option(help="Target ε (patient-level). Required unless --no-dp.")] = None,
    delta: Annotated[float | None, typer.Option(help="δ; default: well below 1/N_patients (≤ 1e-5).")] = None,
    preset: Annotated[
        str, typer.Option(help="cpu-small, cpu-quality, cpu-medium, gpu; cpu-3d, gpu-3d for volume stores.")
    ] = "cpu-small",
    epochs: Annotated[float | None, typer.Option(min=0.01, help="Override the preset's epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Expected patients per step (logical batch).")] = None,
    physical_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Slices × draws per forward pass (patients per pass: this ÷ (m·K)).")
    ] = None,
    noise_multiplicity: Annotated[int | None, typer.Option(min=1, max=64, help="K draws per slice.")] = None,
    slices_per_patient: Annotated[
        int | None, typer.Option(min=1, max=64, help="m slices per sampled patient, averaged before clipping.")
    ] = None,
    trainable: Annotated[
        str | None,
        typer.Option(help="Parameters DP-SGD trains after the prior: all, conditioning, embeddings or lora."),
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option(min=1, max=256, help="Rank of the adapters of --trainable lora.")
    ] = None,
    timestep_sampling: Annotated[
        str | None, typer.Option(help="Timesteps of the DP loss draws: uniform or logit-normal (mid noise).")
    ] = None,
    timestep_mean: Annotated[
        float | None,
        typer.Option(help="Logit-normal focus z ~ N(mean, 1): > 0 toward high noise, < 0 toward fine detail."),
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0, help="Override the preset's learning rate.")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(min=1e-6, help="Clipping norm C of each patient's gradient (no ε cost).")
    ] = None,
    public_pretrain_steps: Annotated[
        int | None, typer.Option(min=0, help="Steps of non-private pretraining on the public prior.")
    ] = None,
    prior_cache: Annotated[
        Path | None, typer.Option(help="Directory to reuse public-prior weights from (public data only).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after S steps (spends less ε).")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(min=1, help="Write a resumable checkpoint every S steps (default: preset).")
    ] = None,
    covariates: Annotated[
        str | None, typer.Option(help="Also condition on covariates of the store: age, sex or age,sex.")
    ] = None,
    age_range: Annotated[
        str, typer.Option(help="Declared age range MIN-MAX (years) a researcher may ask for (a choice, not measured).")
    ] = "18-90",
    accountant: Annotated[str, typer.Option(help="prv or rdp.")] = "prv",
    public_prior: Annotated[
        str | None, typer.Option(help="Non-private pretraining on public data: mni152 (brain MRI) or none.")
    ] = None,
    prediction: Annotated[
        str | None, typer.Option(help="Denoiser target: sample (x0), v_prediction or epsilon.")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the per-patient gradients (2-D presets; every pass padded to one shape, the same "
            "clipped sum; CUDA graphs on a GPU); minutes to compile.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the PUBLIC randomness only (initialisation, public prior, sample grids).")
    ] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from MODEL_DIR/private/checkpoint.pt.")] = False,
    allow_over_budget: Annotated[
        bool, typer.Option(help="Train even if the store's privacy budget would be exceeded (ask first).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Retrain even if OUT holds a model.")] = False,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train WITHOUT differential privacy.")] = False,
    i_understand_not_private: Annotated[
        bool, typer.Option("--i-understand-not-private", help="Required together with --no-dp.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: settings).")] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(help="Train in N processes on this machine (torch.distributed: one per GPU, or per CPU group)."),
    ] = None,
    nnodes: Annotated[int, typer.Option(help="Machines taking part (with --nproc-per-node).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's rank, 0 … --nnodes − 1.")] = 0,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT on node 0 where the machines meet (several machines).")
    ] = None,
    rdzv_timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for the other machines at the rendezvous.")
    ] = 60.0,
) -> None:
    """Train the class-conditional diffusion model with patient-level DP-SGD and write a model bundle."""
    from generators.errors import InvalidInput, PrivacyPolicy

    # the privacy flags and the preset are checked before torch is imported or a launcher started: a refusal is instant
    if no_dp and not i_understand_not_private:
        raise PrivacyPolicy("--no-dp trains a model WITHOUT privacy; add --i-understand-not-private to confirm")
    if not no_dp and epsilon is None:
        raise InvalidInput("--epsilon is required (or --no-dp --i-understand-not-private for a non-private model)")

    from train.presets import get_preset  # light: a bad preset flag is refused as quickly

    chosen = get_preset(
        preset,
        epochs=epochs,
        batch_size=batch_size,
        physical_batch_size=physical_batch_size,
        noise_multiplicity=noise_multiplicity,
        slices_per_patient=slices_per_patient,
        trainable=trainable,
        lora_rank=lora_rank,
        timestep_sampling=timestep_sampling,
        timestep_mean=timestep_mean,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        public_pretrain_steps=public_pretrain_steps,
        public_prior=public_prior,
        prediction=prediction,
        checkpoint_every=checkpoint_every,
        compile=compile,
    )

    from generators.demographics import declare
    from train.distributed import Launch, current_world, launch
    from train.dp_training import TrainConfig, TrainProgress, train_model

    if nproc_per_node is not None and "LOCAL_RANK" not in os.environ:  # start this command under torchrun
        plan = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
        raise typer.Exit(launch(plan, sys.argv[1:]))
    main_rank = current_world().is_main  # only rank 0 of a distributed run talks to the terminal
    settings = get_settings()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    config = TrainConfig(
        store=store,
        out=out,
        preset=chosen,
        epsilon=None if no_dp else epsilon,
        delta=delta,
        accountant=accountant,
        dp=not no_dp,
        max_steps=max_steps,
        seed=seed,
        device=device or settings.device,
        resume=resume,
        force=force,
        allow_over_budget=allow_over_budget,
        prior_cache=prior_cache,
        covariates=declare(covariates, age_range) if covariates else None,
    )
    bar = _progress(None, "train", "step", quiet=not main_rank)

    def on_plan(plan, total_steps: int) -> None:
        bar.total = total_steps
        if plan is not None:
            bar.write(
                f"privacy plan: ε={plan.target_epsilon} δ={plan.delta:g} ({plan.accountant}, add/remove), "
                f"≈{plan.patients_estimate} patients (DP count), q={plan.sample_rate:.4f}, "
                f"σ={plan.noise_multiplier:.3f}, {plan.steps} planned steps",
                file=sys.stderr,
            )
        else:
            bar.write("NOT PRIVATE: training without differential privacy", file=sys.stderr)

    phase = {"name": ""}

    def on_step(info: TrainProgress) -> None:
        if info.phase != phase["name"]:  # "public prior" (non-private pretraining), then "dp"
            phase["name"] = info.phase
            bar.set_description("train (DP)" if info.phase == "dp" else info.phase)
            bar.reset(total=info.total)
        bar.n = info.step
        postfix = {"loss": f"{info.loss:.4f}"}
        if info.epsilon is not None:
            postfix["ε"] = f"{info.epsilon:.2f}"
        bar.set_postfix(postfix, refresh=True)

    with bar:
        result = train_model(config, progress=on_step, on_plan=on_plan)
    if not main_rank:
        return
    if result.interrupted:
        stopped = f"{result.stopped_at}/{result.total_steps}"
        typer.echo(f"interrupted at step {stopped}; checkpoint saved — rerun with --resume")
        raise typer.Exit(130)
    assert result.card is not None
    card = result.card.to_json()
    if result.reused:
        typer.echo(f"{out} is up to date (same store, preset and privacy settings): reusing it")
    if card.get("dp"):
        typer.echo(
            f"model: {out}  ε={card['epsilon']:.3f} δ={card['delta']:g} ({card['accountant']}, privacy unit: "
            f"{card['privacy_unit']}), {card['steps']} steps, target met: {card['target_epsilon_met']}"
        )
    else:
        typer.echo(f"model: {out}  NOT PRIVATE (dp: false), {card['steps']} steps")
    from generators.layout import BundleLayout

    grids = ", ".join(str(BundleLayout(out).sample_grid(label)) for label in card["labels"])
    typer.echo(f"unfiltered sample grids (internal, never served): {grids}")


@app.command("privacy-budget")
def privacy_budget(
    patients: Annotated[int, typer.Option(min=2, help="Number of training patients.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Expected patients per step.")],
    epochs: Annotated[float, typer.Option(min=0.01, help="Epochs over the patients.")],
    epsilon: Annotated[float, typer.Option(help="Target ε.")],
    delta: Annotated[float | None, typer.Option(help="δ (default: well below 1/patients).")] = None,
    accountant: Annotated[str, typer.Option(help="prv or rdp.")] = "prv",
) -> None:
    """Print the noise multiplier, steps and sampling rate for a privacy target (no model involved).

    As in training, ε includes the store's DP patient count (one Gaussian release, σ = 10 patients).
    """
    from train.accounting import count_mechanism, plan_privacy, public_default_delta

    plan = plan_privacy(
        target_epsilon=epsilon,
        delta=delta if delta is not None else public_default_delta(patients),
        patients_estimate=patients,
        batch_size=batch_size,
        epochs=epochs,
        accountant=accountant,
        prior=[count_mechanism()],
    )
    typer.echo(
        f"noise multiplier σ = {plan.noise_multiplier:.4f}\nsteps = {plan.steps}\n"
        f"sampling rate q = {plan.sample_rate:.6f}\nepochs = {plan.epochs:.2f}\n"
        f"ε = {plan.target_epsilon} at δ = {plan.delta:g} ({plan.accountant} accountant, add/remove one patient, "
        "DP patient count included)"
    )


@app.command()
def sample(
    model_dir: Annotated[Path, typer.Argument(help="Model bundle directory.")],
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write.")],
    label: Annotated[list[str], typer.Option(help="Label to sample (repeatable); default all labels.")] = [],  # noqa: B006
    n: Annotated[int, typer.Option(min=1, max=256, help="Samples per label.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the first sample.")] = 0,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Solver steps.")] = 20,
    guidance: Annotated[float, typer.Option(min=0.0, max=20.0, help="Classifier-free guidance scale.")] = 2.0,
    solver: Annotated[str, typer.Option(help="dpmsolver++, unipc or ddim.")] = "dpmsolver++",
    allow_not_private: Annotated[bool, typer.Option(help="Allow a model trained with --no-dp.")] = False,
) -> None:
    """Look at a model: write a PNG grid of samples (unfiltered; not a dataset for release)."""
    from generators.base import save_grid
    from generators.registry import load_generator
    from train.dp_training import ensure_private_ok

    model = load_generator(model_dir, device=get_settings().device)
    ensure_private_ok(model.card, allow_not_private=allow_not_private)
    labels = label or list(model.label_ids)
    options = model.sampling_options(steps=steps, guidance=guidance, solver=solver)
    generated = model.generate(labels={name: n for name in labels}, seed=seed, **options)
    save_grid(generated.images, out, columns=n)
    typer.echo(f"wrote {len(generated.labels)} samples ({', '.join(labels)}; one row per label) to {out}")


def _export_spec(
    model_dir: Path, n: int | None, count: list[str], spec: Path | None, age: str | None, sex: str | None, seed: int
) -> tuple[dict[str, int], dict[str, dict], int]:
    """Counts, covariate targets and seed from ``--spec`` or from ``--n`` / ``--count`` with ``--age`` / ``--sex``,
    checked against the model's card: a bad request is refused before the model's libraries are imported."""
    from app.cohort_spec import check_counts, check_covariates, parse_covariates, read_spec
    from generators.card import read_card
    from generators.errors import InvalidInput

    card = read_card(model_dir)
    if spec is not None:
        if n is not None or count or age or sex:
            raise InvalidInput("--spec holds the whole request: leave out --n, --count, --age and --sex")
        parsed = read_spec(str(spec))
        counts, covariates = parsed.counts, parsed.covariates_json()
        seed = parsed.seed if "seed" in parsed.model_fields_set else seed
    else:
        counts, covariates = _counts_and_targets(list(card.labels), n, count, age, sex)
    check_counts(counts, card.labels)
    check_covariates(parse_covariates(covariates), counts, card.covariates)
    return counts, covariates, seed


def _counts_and_targets(
    labels: list[str], n: int | None, count: list[str], age: str | None, sex: str | None
) -> tuple[dict[str, int], dict[str, dict]]:
    """Counts from ``--n`` (every one of ``labels``) or ``--count``; the same ``--age`` / ``--sex`` targets for each."""
    from app.cohort_spec import targets_from_flags
    from generators.errors import InvalidInput

    counts: dict[str, int] = {}
    for item in count:
        label, sep, value = item.partition("=")
        if not sep or not label:
            raise InvalidInput(f"--count expects LABEL=N, got {item!r}")
        try:
            counts[label] = int(value)
        except ValueError:
            raise InvalidInput(f"--count {item!r}: N must be an integer") from None
    if (n is None) == (not counts):
        raise InvalidInput("give either --n N (samples of every label) or --count LABEL=N ...")
    if n is not None:
        counts = {label: n for label in labels}
    targets = targets_from_flags(age, sex)
    return counts, ({label: targets for label in counts} if targets else {})


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="Model bundle directory (calibrated).")],
    out: Annotated[Path, typer.Option("--out", help="Dataset directory to create.")],
    n: Annotated[int | None, typer.Option("--n", help="Samples of EVERY label.")] = None,
    count: Annotated[list[str], typer.Option(help="LABEL=N (repeatable).")] = [],  # noqa: B006
    spec: Annotated[
        Path | None, typer.Option(help="YAML/JSON cohort spec: counts, covariates per label, seed (see README).")
    ] = None,
    age: Annotated[str | None, typer.Option(help="Age of every sample: YEARS or MIN-MAX (covariate models).")] = None,
    sex: Annotated[str | None, typer.Option(help="Sex of every sample: F, M or F=P,M=P (covariate models).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the cohort; every sample's own seed is recorded.")] = 0,
    format: Annotated[
        str, typer.Option("--format", help="Comma-separated: nifti (required), png, npz, dicom.")
    ] = "nifti",
    workers: Annotated[int, typer.Option(min=1, max=512, help="Worker processes or Ray actors.")] = 1,
    backend: Annotated[str, typer.Option(help="local or ray.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, max=4096, help="Samples per shard (unit of resume).")] = 64,
    max_rejection_rate: Annotated[float, typer.Option(min=0.01, max=1.0, help="Stop above this rejection rate.")] = 0.5,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted export.")] = False,
    allow_not_private: Annotated[
        bool, typer.Option(help="Allow a model trained with --no-dp (outputs say NOT PRIVATE).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: settings).")] = None,
) -> None:
    """Generate → filter → write a synthetic cohort (NIfTI + manifest + privacy report), resumably."""
    import time

    from app.export_destination import check_destination

    counts, covariates, seed = _export_spec(model_dir, n, count, spec, age, sex, seed)  # before the heavy imports
    check_destination(out, resume)

    from app.pipeline import CohortRequest, build_cohort, local_runner
    from generators.errors import InvalidInput

    request = CohortRequest(
        counts=counts,
        seed=seed,
        covariates=covariates,
        formats=tuple(f.strip() for f in format.split(",") if f.strip()),
        shard_size=shard_size,
        max_rejection_rate=max_rejection_rate,
        allow_not_private=allow_not_private,
    )
    chosen_device = device or get_settings().device
    if backend == "ray":
        from app.ray_backend import ray_runner

        runner = ray_runner(model_dir, workers, chosen_device, ray_address)
    elif backend == "local":
        runner = local_runner(model_dir, workers, chosen_device) if workers > 1 else None
    else:
        raise InvalidInput(f"unknown backend {backend!r}; choose local or ray")
    start = time.perf_counter()
    bar = _progress(sum(counts.values()), "export", "sample")
    totals = {}

    def on_progress(state) -> None:  # the filter's totals reach the operator's terminal, never the dataset
        totals.update(generated=state.generated, rejected=state.rejected)
        bar.n = state.accepted
        rate = state.rejected / state.generated if state.generated else 0.0
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix({"samples/s": f"{state.accepted / elapsed:.1f}", "rejected": f"{rate:.1%}"}, refresh=True)

    with bar:
        manifest = build_cohort(
            model_dir, request, out, runner=runner, resume=resume, device=chosen_device, progress=on_progress
        )
    report = json.loads((out / "privacy_report.json").read_text())
    counts_done = report["counts"]
    per_label = ", ".join(f"{label} {n}" for label, n in counts_done["per_label"].items())
    typer.echo(f"dataset {out}: {counts_done['samples']} samples ({per_label}); {time.perf_counter() - start:.1f} s")
    if totals:
        typer.echo(
            f"  operator only (not in the dataset): {totals['generated']} generated, {totals['rejected']} rejected "
            "by the memorization filter in this run"
        )
    dp = report["differential_privacy"]
    if report["private"]:
        typer.echo(f"  privacy: ε = {dp['epsilon']:.3g}, δ = {dp['delta']:g} per patient ({dp['accountant']})")
    else:
        typer.echo("  NOT PRIVATE: the model was trained without differential privacy")
    typer.echo(
        f"  manifest {out / 'manifest.json'}, report {out / 'privacy_report.json'} ({len(manifest['samples'])} rows)"
    )


@app.command()
def card(model_dir: Annotated[Path, typer.Argument(help="Model bundle directory.")]) -> None:
    """Print a model's privacy guarantee and, if calibrated, its filter summary (public fields only)."""
    from app.model_registry import read_filter_summary
    from generators.card import read_card

    model_card = read_card(model_dir)
    if model_card.dp:
        estimate = (model_card.patients_estimate or {}).get("value")
        typer.echo(
            f"model {model_dir}: DP, privacy unit {model_card.privacy_unit}: ε = {model_card.epsilon:.3f}, "
            f"δ = {model_card.delta:g} ({model_card.accountant} accountant), "
            f"σ = {model_card.noise_multiplier:.3f}, "
            f"C = {model_card.max_grad_norm}, q = {model_card.sample_rate:.4f}, {model_card.steps} steps, "
            f"≈{estimate} training {model_card.privacy_unit}s (DP count)"
        )
    else:
        typer.echo(f"model {model_dir}: NOT PRIVATE (trained without differential privacy)")
    shape = " × ".join(map(str, model_card.image_shape))
    typer.echo(f"  {model_card.generator} model, labels {list(model_card.labels)}, {shape} px")
    if model_card.denoiser:
        recipe = model_card.denoiser
        typer.echo(
            f"  denoiser: {recipe['network']} {recipe['channels']}, {recipe['norm']}; predicts "
            f"{recipe['prediction']}, loss weighting {recipe['loss_weighting']}, {recipe['timesteps']}"
        )
    if model_card.covariates:
        declared = model_card.covariates
        parts = [f"age {declared['age']['min']}-{declared['age']['max']} (declared)"] if "age" in declared else []
        parts += ["sex F/M"] if "sex" in declared else []
        typer.echo(f"  conditioned on covariates: {', '.join(parts)}")
    summary = read_filter_summary(model_dir)
    if summary is not None:
        typer.echo(
            f"  memorization filter: q = {summary['quantile']}, held-out acceptance "
            f"{summary['holdout_acceptance_rate']:.0%}, canary rejection {summary['canary_rejection_rate']:.0%} "
            "(outside ε)"
        )
    else:
        typer.echo("  memorization filter: not calibrated (run `synthcohort calibrate STORE MODEL_DIR`)")


@app.command("public-copy")
def public_copy(
    model_dir: Annotated[Path, typer.Argument(help="Model bundle directory (calibrated).")],
    out: Annotated[Path, typer.Option("--out", help="Where the copy goes (replaced atomically if it exists).")],
) -> None:
    """Copy a bundle's public parts (card, weights, filter summary) for API processes, which need nothing else."""
    import shutil
    import tempfile

    from generators.atomic import publish_directory
    from generators.card import card_exists
    from generators.errors import InvalidInput
    from generators.layout import BundleLayout

    layout = BundleLayout(model_dir)
    if not card_exists(model_dir):
        raise InvalidInput(f"{model_dir} is not a model bundle (no model card)")
    if not layout.filter_summary.is_file():
        raise InvalidInput(f"{model_dir} is not calibrated: run `synthcohort calibrate STORE {model_dir}` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for part in layout.public_parts():
        (shutil.copytree if part.is_dir() else shutil.copy2)(part, work / part.name)
    publish_directory(work, out)
    typer.echo(f"public copy of {model_dir}: {out} ({', '.join(p.name for p in layout.public_parts())})")


@app.command()
def serve(
    models: Annotated[Path, typer.Option("--models", help="Directory with one model bundle per subdirectory.")],
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    db: Annotated[
        str | None, typer.Option(help="Database URL (default: SYNTHCOHORT_DB_URL or SQLite in data dir).")
    ] = None,
    allow_not_private: Annotated[
        bool, typer.Option(help="Also serve models trained without DP (marked NOT PRIVATE).")
    ] = False,
    worker: Annotated[
        bool,
        typer.Option(help="Also run cohort jobs in this process (--no-worker: API only, for `synthcohort worker`)."),
    ] = True,
) -> None:
    """Run the REST service: model cards, cohort jobs, datasets (and, by default, the jobs themselves)."""
    import uvicorn

    from app.api.main import create_app

    settings = _settings_with(db)
    application = create_app(settings, models, allow_not_private=allow_not_private, run_jobs=worker)
    uvicorn.run(  # behind a proxy: the client's address and scheme from its forwarded headers, if trusted
        application,
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


@app.command("worker")
def worker_command(
    models: Annotated[Path, typer.Option("--models", help="Directory with one model bundle per subdirectory.")],
    db: Annotated[
        str | None, typer.Option(help="Database URL (default: SYNTHCOHORT_DB_URL or SQLite in data dir).")
    ] = None,
    allow_not_private: Annotated[
        bool, typer.Option(help="Also run jobs of models trained without DP (as `serve --allow-not-private`).")
    ] = False,
) -> None:
    """Run cohort jobs only, for API processes started with `serve --no-worker` on the same database and data
    directory. Stops on SIGTERM or Ctrl-C, giving running jobs back to the other workers."""
    import signal
    import threading

    from app.jobs import job_runner
    from app.model_registry import ModelRegistry

    settings = _settings_with(db)
    runner = job_runner(
        settings, ModelRegistry(models, allow_not_private=allow_not_private), workers=settings.job_workers
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runner.start()
    _echo_err(f"worker {runner.owner}: running up to {settings.job_workers} job(s) at once; Ctrl-C stops")
    while not stop.wait(1.0):  # a timed wait, so signals are handled promptly
        pass
    runner.shutdown()
    _echo_err("worker stopped; its unfinished jobs were given back")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="researcher or admin.")] = "researcher",
    quota_samples_per_day: Annotated[
        int | None,
        typer.Option(min=1, help="Samples per 24 h for this key (default: SYNTHCOHORT_DEFAULT_DAILY_QUOTA)."),
    ] = None,
    expires_days: Annotated[
        float | None, typer.Option(min=0.001, max=3650, help="The key stops working this many days from now.")
    ] = None,
    db: Annotated[
        str | None, typer.Option(help="Database URL (default: SYNTHCOHORT_DB_URL or SQLite in data dir).")
    ] = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from app.db import record_event, session_factory
    from app.keys import create_key

    with session_factory(_settings_with(db))() as session:
        row, token = create_key(
            session, role=role, quota_samples_per_day=quota_samples_per_day, expires_days=expires_days
        )
        record_event(session, action="key.create", outcome="ok", key_id=row.id, detail=f"role={row.role}")
    typer.echo(token)
    until = f", valid until {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else ""
    _echo_err(f"key {row.prefix} ({row.role}) created{until}; store it now: it cannot be shown again")


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's prefix (`keys list`).")],
    db: Annotated[str | None, typer.Option(help="Database URL.")] = None,
) -> None:
    """Revoke a key: every API process refuses it from its next request on."""
    from app.db import record_event, session_factory
    from app.keys import revoke_key

    with session_factory(_settings_with(db))() as session:
        row = revoke_key(session, prefix)
        record_event(session, action="key.revoke", outcome="ok", key_id=row.id)
    _echo_err(f"key {row.prefix} revoked")


@keys_app.command("list")
def keys_list(db: Annotated[str | None, typer.Option(help="Database URL.")] = None) -> None:
    """List keys (prefix, role, quota; never the key itself)."""
    from app.db import session_factory
    from app.keys import key_state, list_keys

    settings = _settings_with(db)
    with session_factory(settings)() as session:
        for row in list_keys(session):
            quota = row.quota_samples_per_day or f"{settings.default_daily_quota} (default)"
            state = key_state(row)
            typer.echo(f"{row.prefix}  {row.role:10s}  quota/day {quota}  {state}  created {row.created_at:%Y-%m-%d}")


@db_app.command("upgrade")
def db_upgrade(db: Annotated[str | None, typer.Option(help="Database URL.")] = None) -> None:
    """Apply pending schema migrations (keys, jobs and the audit log are kept)."""
    from app.db import database_url, upgrade

    before, after = upgrade(database_url(_settings_with(db)))
    _echo_err(f"database schema: {before or 'empty'} -> {after}" if before != after else f"already at {after}")


@db_app.command("current")
def db_current(db: Annotated[str | None, typer.Option(help="Database URL.")] = None) -> None:
    """Print the schema revision the database is at, and the one this version needs."""
    from app.db import database_url, head_revision, make_engine, revision_of

    engine = make_engine(database_url(_settings_with(db)))
    try:
        typer.echo(f"{revision_of(engine) or 'empty'} (this version needs {head_revision()})")
    finally:
        engine.dispose()


@app.command("audit-log")
def audit_log(
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Most recent N events.")] = 50,
    db: Annotated[str | None, typer.Option(help="Database URL.")] = None,
) -> None:
    """Print the audit log: who, when, what, outcome, dataset."""
    from app.db import audit_events, session_factory

    with session_factory(_settings_with(db))() as session:
        events = audit_events(session, limit=limit)
    if not events:
        typer.echo("audit log is empty")
    for e in events:
        counts = json.dumps(e.counts) if e.counts else "-"
        typer.echo(
            f"{e.at:%Y-%m-%dT%H:%M:%S}  key={e.key_id or '-'}  {e.action:14s} model={e.model or '-'}  "
            f"counts={counts}  {e.outcome}  dataset={e.dataset_id or '-'}  {e.detail or ''}".rstrip()
        )


def _print_store(store) -> None:
    """Exact counts for the operator's terminal (never published), and the store's privacy budget."""
    report = store.report
    side, what = store.image_size, ("volumes" if store.spatial_dims == 3 else "slices")
    typer.echo(f"cohort store {store.path}: {store.n_slices} {what} of {'x'.join([str(side)] * store.spatial_dims)}")
    for split in ("train", "holdout"):
        patients = report["patients"].get(split, {})
        n_items = report["slices"].get(split, {})
        typer.echo(f"  {split:8s} patients {json.dumps(patients)}  {what} {json.dumps(n_items)}")
    typer.echo(
        f"  privacy unit: {store.privacy_unit}; published size: ≈{store.patients_estimate} training "
        f"{store.privacy_unit}s (DP count, noise σ = {store.meta['patients_estimate']['noise_std']:g})"
    )
    ledger = store.ledger()
    budget = ledger.budget()
    typer.echo(
        f"  privacy budget: spent ε = {budget.spent:.2f} of {budget.epsilon:g} at δ = {budget.delta:g}, remaining "
        f"{budget.remaining:.2f} ({budget.accountant} composition of {len(ledger.counted())} releases)"
    )
    typer.echo(f"  store id {store.store_id}  labels {store.label_names}")


def main() -> None:
    """Console entry point: run the CLI and map domain errors to exit codes."""
    try:
        app()
    except SynthCohortError as error:
        _echo_err(f"error: {error}")
        if getattr(error, "detail", ""):  # the operator's terminal may see what researchers may not
            _echo_err(f"  detail: {error.detail}")
        sys.exit(exit_code_for(error))
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
