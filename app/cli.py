"""The ``synthcohort`` command line. Heavy libraries are imported inside commands so ``--help`` is instant."""

from __future__ import annotations

import json
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


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _progress(total: int | None, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None, file=sys.stderr)


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
    labels: Annotated[Path | None, typer.Option(help="CSV with patient_id,label[,age,sex].")] = None,
    size: Annotated[int, typer.Option(min=8, max=1024, help="In-plane size of stored slices.")] = 64,
    slices: Annotated[int, typer.Option(min=1, max=512, help="Axial slices taken around each volume's centre.")] = 8,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of patients held out (per label).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the patient split.")] = 0,
    allow_burned_in: Annotated[bool, typer.Option(help="Accept DICOM marked BurnedInAnnotation=YES.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: settings).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing store (atomically).")] = False,
    show_paths: Annotated[
        bool, typer.Option(help="Print skipped inputs' paths (paths may contain identifiers; never stored).")
    ] = False,
) -> None:
    """De-identify scans + labels into a private, patient-split cohort store."""
    from train.ingest import IngestOptions, NothingUsable
    from train.ingest import ingest as run_ingest

    options = IngestOptions(
        size=size,
        slices=slices,
        holdout=holdout,
        seed=seed,
        allow_burned_in=allow_burned_in,
        workers=workers or get_settings().workers,
        overwrite=force,
    )
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
    """Summarise a cohort store (counts per split and label; no identifiers)."""
    from train.store import CohortStore

    _print_store(CohortStore.open(store))


def _print_store(store) -> None:
    report = store.report
    typer.echo(f"cohort store {store.path}: {store.n_slices} slices of {store.image_size}x{store.image_size}")
    for split in ("train", "holdout"):
        patients = report["patients"].get(split, {})
        n_slices = report["slices"].get(split, {})
        typer.echo(f"  {split:8s} patients {json.dumps(patients)}  slices {json.dumps(n_slices)}")
    typer.echo(f"  fingerprint {store.fingerprint[:16]}…  labels {store.label_names}")


def main() -> None:
    """Console entry point: run the CLI and map domain errors to exit codes."""
    try:
        app()
    except SynthCohortError as error:
        _echo_err(f"error: {error}")
        sys.exit(exit_code_for(error))
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
