"""Figures (PNG) and a self-contained ``report.html`` for an audit report (see :mod:`app.audit`).

The HTML embeds every figure as a base64 data URI, so the single file can be mailed to the privacy office.
Training images are drawn only into ``figures/neighbours.png``, which exists only when neighbours were asked for.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from app.audit_schema import AuditReport, Roc
from generators.base import preview_panel, save_grid
from privacy_filters.membership_inference import dp_tpr_bound

FIGURES = "figures"
DPI = 110


def write_report(
    root: Path, report: AuditReport, *, cohort, label_names: list[str], neighbours: dict | None
) -> list[str]:
    """Write ``figures/*.png`` and ``report.html`` under ``root``; returns the figure file names."""
    figures = root / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for i, label in enumerate(label_names):
        images = cohort.images[cohort.labels == i][:32]
        if len(images):
            save_grid(torch.from_numpy(images), figures / f"samples_{label}.png", columns=8, scale=3)
            names.append(f"samples_{label}.png")
    names += [_utility_bars(figures, report), _intensity(figures, report, label_names), _dcr(figures, report)]
    names.append(_roc(figures, report))
    canaries = report.privacy.filter.canaries
    names.append(
        canary_figure(
            canaries.curves,
            report.privacy.filter.holdout_acceptance_rate or 0.0,
            canaries.documented,
            figures / "canaries.png",
        )
    )
    if neighbours is not None:
        names.append(_neighbours(figures, neighbours))
    (root / "report.html").write_text(_html(root, report, names))
    return names


# -------------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path.name


def _utility_bars(figures: Path, report: AuditReport) -> str:
    u = report.utility
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    x = np.arange(2)
    for k, (name, scores, colour) in enumerate((("trtr", u.trtr, "#4c72b0"), ("tstr", u.tstr, "#dd8452"))):
        values = [scores.accuracy, scores.auc]
        errors = [scores.accuracy_sd, scores.auc_sd]
        bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, yerr=errors, capsize=3, color=colour, label=name.upper())
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, ["accuracy", "ROC AUC"])
    ax.set_ylim(0, 1.1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title("Utility on the real held-out patients")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, figures / "utility.png")


def _intensity(figures: Path, report: AuditReport, label_names: list[str]) -> str:
    hist = report.fidelity.intensity
    fig = Figure(figsize=(4.2 * len(label_names), 3))
    axes = fig.subplots(1, len(label_names), squeeze=False)
    for ax, label in zip(axes[0], label_names, strict=True):
        if label not in hist:
            ax.set_axis_off()
            continue
        h = hist[label]
        centres = (np.array(h.edges[:-1]) + np.array(h.edges[1:])) / 2
        ax.plot(centres, h.real_density, label="real (train)", color="#4c72b0")
        ax.plot(centres, h.synthetic_density, label="synthetic", color="#dd8452")
        ax.set_yscale("log")
        ax.set_title(f"{label}: W1 = {h.wasserstein:.3f}", fontsize=9)
        ax.set_xlabel("pixel value")
    axes[0][0].legend(fontsize=8)
    return _save(fig, figures / "intensity.png")


def _dcr(figures: Path, report: AuditReport) -> str:
    d = report.privacy.dcr.distances_to_train
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    everything = np.concatenate([d.holdout, d.synthetic_unfiltered, d.synthetic_filtered])
    bins = np.linspace(0, np.quantile(everything, 0.995), 50).tolist()
    ax.hist(d.holdout, bins=bins, density=True, alpha=0.5, label="held-out real → train", color="#4c72b0")
    ax.hist(
        d.synthetic_unfiltered,
        bins=bins,
        density=True,
        histtype="step",
        lw=1.5,
        label="synthetic, filter off → train",
        color="#c44e52",
    )
    ax.hist(
        d.synthetic_filtered,
        bins=bins,
        density=True,
        alpha=0.5,
        label="synthetic, released → train",
        color="#dd8452",
    )
    ax.axvline(d.filter_threshold, color="black", ls="--", lw=1, label="filter threshold")
    ax.set_xlabel("distance to the closest training slice (filter embedding)")
    ax.set_title("Distance to closest record")
    ax.legend(fontsize=7)
    return _save(fig, figures / "dcr.png")


def _roc(figures: Path, report: AuditReport) -> str:
    m = report.privacy.membership_inference
    bound = report.privacy.dp_bound
    curves: list[tuple[str, Roc, str]] = [
        ("loss attack (white box)", m.loss, "#4c72b0"),
        ("Monte-Carlo, released samples", m.monte_carlo.filtered, "#dd8452"),
        ("Monte-Carlo, filter off", m.monte_carlo.unfiltered, "#c44e52"),
    ]
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    grid = np.logspace(-4, 0, 400)
    for ax, log in zip(axes, (False, True), strict=True):
        for name, c, colour in curves:
            ax.plot(c.fpr, c.tpr, color=colour, label=f"{name}: AUC {c.auc:.3f}")
        ax.plot(grid, grid, color="grey", ls=":", lw=1, label="chance")
        if bound.private and bound.privacy_curve:
            curve = [(p["epsilon"], p["delta"]) for p in bound.privacy_curve]
            ax.plot(
                grid,
                dp_tpr_bound(grid, curve),
                color="black",
                ls="--",
                lw=1,
                label=f"(ε, δ) bound: AUC ≤ {bound.auc:.3f}",
            )
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1.05)
            ax.set_title("log scale (low FPR matters)")
        else:
            ax.set_title("Membership inference, per patient")
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, figures / "mia_roc.png")


def canary_figure(curves: dict, acceptance: float, documented: dict, path: Path, title: str = "") -> str:
    """One panel per near-copy transform: share rejected against strength, the documented strength, and the
    share of held-out patients the filter rejects (the price of rejecting copies)."""
    kinds = list(curves)
    cols = 4
    rows = (len(kinds) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        ax.plot([p["strength"] for p in curves[kind]], [p["rejected"] for p in curves[kind]], marker="o", ms=3)
        ax.axhline(1 - acceptance, color="grey", linestyle=":", label="held-out patients rejected")
        if kind in documented:
            ax.axvline(documented[kind], color="#c44e52", alpha=0.5, label="documented strength")
        ax.set_title(kind, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("share rejected", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _neighbours(figures: Path, neighbours: dict) -> str:
    syn, trn, scores = neighbours["synthetic"], neighbours["training"], neighbours["scores"]
    fig = Figure(figsize=(1.3 * len(syn), 3))
    axes = fig.subplots(2, len(syn), squeeze=False)
    for j in range(len(syn)):
        for row, image in ((0, syn[j]), (1, trn[j])):
            axes[row][j].imshow(preview_panel(image[0]), cmap="gray", vmin=-1, vmax=1)
            axes[row][j].set_axis_off()
        axes[0][j].set_title(f"score {scores[j]:.2f}", fontsize=7)
    fig.suptitle("Closest unfiltered samples (top) and their nearest TRAINING slices (bottom) — PRIVATE", fontsize=8)
    return _save(fig, figures / "neighbours.png")


# ----------------------------------------------------------------------------------------------- HTML
def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _rows(pairs: Sequence[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs)


def _img(root: Path, name: str, alt: str) -> str:
    data = base64.b64encode((root / FIGURES / name).read_bytes()).decode()
    caption = html.escape(alt)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
    )


def _covariate_section(c: dict | None) -> str:
    """How well requested covariates are honoured (models trained on them only)."""
    if not c:
        return ""
    if "finding" in c:
        return f"<h2>Covariates</h2><p>{html.escape(c['finding'])}</p>"
    rows = []
    age, sex = c.get("age", {}), c.get("sex", {})
    if "mae_synthetic" in age:
        rows += [
            (
                "Age MAE, years: synthetic vs requested / real held-out vs true",
                f"{age['mae_synthetic']:.1f} / {age['mae_real_holdout']:.1f}",
            ),
            (
                "Age MAE of a constant guess (training mean): synthetic / real",
                f"{age['mae_constant_synthetic']:.1f} / {age['mae_constant_real_holdout']:.1f}",
            ),
            (
                "Age correlation: synthetic / real held-out",
                f"{age['correlation_synthetic']:.2f} / {age['correlation_real_holdout']:.2f}",
            ),
        ]
    if "accuracy_synthetic" in sex:
        rows.append(
            (
                "Sex accuracy: synthetic vs requested / real held-out (chance 0.5)",
                f"{sex['accuracy_synthetic']:.3f} / {sex['accuracy_real_holdout']:.3f}",
            )
        )
    notes = "".join(f"<p>{html.escape(str(part['note']))}</p>" for part in (age, sex) if "note" in part)
    return f"<h2>Covariates</h2><table>{_rows(rows)}</table>{notes}<p><small>{html.escape(c['method'])}</small></p>"


def _html(root: Path, r: AuditReport, figures: list[str]) -> str:
    model, u, f, p = r.model, r.utility, r.fidelity, r.privacy
    mi, bound, dcr = p.membership_inference, p.dp_bound, p.dcr
    if model.dp and model.epsilon is not None:
        guarantee = f"ε = {model.epsilon:.3g}, δ = {model.delta:g} per patient ({html.escape(str(model.accountant))})"
    else:
        guarantee = "NOT PRIVATE — trained without differential privacy"
    ceiling = (
        f"{bound.tpr_at_low_fpr:.3f} TPR at 1% FPR, AUC ≤ {bound.auc:.3f}"
        if bound.private and bound.tpr_at_low_fpr is not None and bound.auc is not None
        else "none (no DP)"
    )
    small_n = (
        [
            (
                "TSTR accuracy on the cohort's n per label only (the earlier, smaller protocol)",
                f"{u.tstr_small_n.accuracy:.3f}  (ratio {u.ratio_small_n.accuracy:.3f})",
            )
        ]
        if u.tstr_small_n is not None and u.ratio_small_n is not None
        else []
    )
    headline = _rows(
        [
            ("Privacy guarantee", guarantee),
            (
                "TSTR / TRTR accuracy",
                f"{u.tstr.accuracy:.3f} / {u.trtr.accuracy:.3f}  (ratio {u.ratio.accuracy:.3f})",
            ),
            ("TSTR / TRTR AUC", f"{u.tstr.auc:.3f} / {u.trtr.auc:.3f}  (ratio {u.ratio.auc:.3f})"),
            *small_n,
            ("TSTR protocol", u.protocol),
            (
                "Fréchet distance ratio (synthetic vs real baseline, classifier features)",
                f.frechet.classifier_features.ratio,
            ),
            ("DCR share, released samples (target ≈ 0.5)", dcr.share_filtered),
            (
                "Filter catch rate on unfiltered samples (unseen patients: about q)",
                f"{p.filter.catch_rate_unfiltered:.1%} (q = {p.filter.quantile:.0%})",
            ),
            (
                "Near-copies rejected at the documented strengths (covered kinds; worst kind)",
                f"{p.filter.canaries.covered_rejection:.1%}; {p.filter.canaries.worst}",
            ),
            ("Loss attack: AUC / TPR at 1% FPR", f"{mi.loss.auc:.3f} / {mi.loss.tpr_at_low_fpr:.3f}"),
            (
                "Monte-Carlo attack on released samples: AUC / TPR at 1% FPR",
                f"{mi.monte_carlo.filtered.auc:.3f} / {mi.monte_carlo.filtered.tpr_at_low_fpr:.3f}",
            ),
            ("Ceiling from (ε, δ) for ANY attack", ceiling),
        ]
    )
    fr = f.frechet
    fidelity_rows = _rows(
        [
            ("FD classifier features: synthetic vs holdout", fr.classifier_features.synthetic_vs_holdout),
            ("FD classifier features: train vs holdout (baseline)", fr.classifier_features.train_vs_holdout),
            ("FD filter embedding: synthetic vs holdout", fr.filter_embedding.synthetic_vs_holdout),
            ("FD filter embedding: train vs holdout (baseline)", fr.filter_embedding.train_vs_holdout),
            *[(f"MS-SSIM within synthetic, {k}", v) for k, v in f.ms_ssim.synthetic.items()],
            *[(f"MS-SSIM within real, {k}", v) for k, v in f.ms_ssim.real.items()],
        ]
    )
    covariate_section = _covariate_section(r.covariates)
    images = "".join(_img(root, name, name.removesuffix(".png").replace("_", " ")) for name in figures)
    notes = "".join(
        f"<li>{html.escape(text)}</li>"
        for text in (
            fr.feature_spaces,
            f.ms_ssim.meaning,
            u.classifier + "; tested on " + u.test_set,
            dcr.reference,
            mi.loss.attack or "",
            mi.monte_carlo.attack,
            bound.meaning or bound.statement or "",
            p.filter.meaning,
            p.filter.canaries.meaning,
        )
    )
    finding = ""
    if r.cohort.pipeline_stopped:
        finding = (
            '<p class="notice"><b>FINDING: the release pipeline refused this model.</b> '
            f"{html.escape(str(r.cohort.finding))} Measured instead on {html.escape(r.cohort.source)}.</p>"
        )
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in r.timings_s.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthcohort audit — {html.escape(model.dir_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
.notice {{ background: #fde2e1; border: 1px solid #c44e52; padding: .6em 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; }}
th {{ background: #f4f4f4; font-weight: 600; }} figure {{ display: inline-block; margin: .5em; }}
figcaption {{ font-size: .8em; color: #555; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>Privacy and utility audit</h1>
<p class="notice">{html.escape(r.notice)}</p>{finding}
<p>Model <code>{html.escape(model.dir_name)}</code> (preset {html.escape(str(model.preset))},
{model.image_size} px), store {html.escape(r.store.fingerprint[:12])}…:
{r.store.n_train_patients} training and {r.store.n_holdout_patients} held-out patients.
Cohort: {r.cohort.per_label} samples per label, seed {r.settings["seed"]} — {html.escape(r.cohort.reproduce)}.
Created {html.escape(r.created)}.</p>
<h2>Headline numbers</h2><table>{headline}</table>
<h2>Fidelity and diversity</h2><table>{fidelity_rows}</table>{covariate_section}
<h2>Figures</h2>{images}
<h2>How each number was measured</h2><ul>{notes}</ul>
<p><small>Timings: {html.escape(timings)}. Every number is in <code>report.json</code>.</small></p>
</body></html>
"""
