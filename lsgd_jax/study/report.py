"""The study's tables, verdicts, plots and the snapshot in the results README."""

from __future__ import annotations

import json
import math
import os

from lsgd_jax.metrics import read_metrics
from lsgd_jax.study.definitions import (
    PAPER_EPOCHS,
    PAPER_REFERENCE_KN,
    PAPER_TRAIN_EXAMPLES,
    Paths,
    Scale,
    Study,
    unique_runs,
)
from lsgd_jax.study.definitions import stored_large_kn
from lsgd_jax.study.runner import metrics_dir, run_error, run_seconds, status
from lsgd_jax.verdicts import aggregate, format_cell, verdict_matches, verdict_worse

def study_table(study: Study, scale: Scale) -> tuple[str, dict]:
    """Markdown table and JSON record of one study from the runs finished so far."""
    lines = [f"### {study.title}", "",
             "| setting | kn | iterations/epoch (paper's) | iterations (paper's) | peak rate | "
             "top-1 error % here | paper, ImageNet % |", "|---|---|---|---|---|---|---|"]
    record = {"study": study.key, "title": study.title, "rows": []}
    for row in study.rows:
        run = row.runs[0]
        kn = int(run.flag("--batch-size"))
        peak = float(run.flag("--base-lr")) * kn / int(run.flag("--reference-batch-size"))
        values = [run_error(r) for r in row.runs]
        agg = aggregate(values)
        spe = scale.train_examples // kn
        total = math.ceil(spe * scale.epochs)
        if scale.num_steps is not None:
            total = min(total, scale.num_steps)
        paper_spe = PAPER_TRAIN_EXAMPLES // round(kn / scale.reference_kn * PAPER_REFERENCE_KN)
        lines.append(f"| {row.label} | {kn} | {spe} ({paper_spe:,}) | {total:,} "
                     f"({paper_spe * PAPER_EPOCHS:,}) | {peak:.3g} | {format_cell(agg)} | "
                     f"{row.paper} |")
        record["rows"].append({"label": row.label, "kn": kn, "peak_lr": peak,
                               "iterations_per_epoch": spe, "iterations": total,
                               "runs": {r.name: v for r, v in zip(row.runs, values)},
                               **agg, "paper": row.paper})
    return "\n".join(lines) + "\n", record


def claims(studies: list[Study], scale: Scale) -> list[str]:
    """One line per claim of the paper: the verdict and the numbers that decide it."""
    by_key = {s.key: s for s in studies}
    agg = {}
    for study in studies:
        for row in study.rows:
            agg[(study.key, row.label)] = aggregate([run_error(r) for r in row.runs])
    tol = scale.tolerance
    lines = []
    sweep = by_key["kn_sweep"]
    ref_row = sweep.rows[0]
    ref = agg[("kn_sweep", ref_row.label)]
    lines.append(f"- Reference kn={scale.reference_kn}: {format_cell(ref)} % top-1 error "
                 f"(goal: at most 10 %).")
    for row in sweep.rows[1:]:
        k = int(row.runs[0].flag("--batch-size")) // scale.reference_kn
        v, why = verdict_matches(agg[("kn_sweep", row.label)], ref, tol)
        lines.append(f"- Linear scaling + gradual warmup, k={k} ({row.label.split(',')[0]}) "
                     f"matches the reference within {tol:g} points: **{v}** "
                     f"({format_cell(agg[('kn_sweep', row.label)])} vs reference; {why}).")
    checks = {
        "warmup": [(1, 3, "no warmup is worse than gradual warmup (table 1)"),
                   (2, 3, "constant warmup is worse than gradual warmup (table 1)")],
        "lr_rule": [(1, 4, "the unscaled rate η is worse than η·k (table 2a)"),
                    (2, 4, "η·√k is worse than η·k (table 2a)"),
                    (3, 4, "η·k × ½ is worse than η·k (table 2a)"),
                    (5, 4, "η·k × 2 is worse than η·k (table 2a)")],
        "zero_gamma": [(1, 2, "γ = 1 is worse than zero-γ at the large kn (table 2b)")],
        "momentum": [(1, 3, "eq. (10) without the correction is worse than eq. (9) (sec. 2.2)")],
    }
    for key, items in checks.items():
        if key not in by_key:
            lines.append(f"- {key}: waits for the kn sweep to choose the ablations' kn.")
            continue
        rows = by_key[key].rows
        for i, j, text in items:
            a, b = agg[(key, rows[i].label)], agg[(key, rows[j].label)]
            v, why = verdict_worse(a, b, tol)
            lines.append(f"- {text}: **{v}** ({format_cell(a)} vs {format_cell(b)}; {why}).")
    if "momentum" in by_key:
        rows = by_key["momentum"].rows
        a, b = agg[("momentum", rows[2].label)], agg[("momentum", rows[3].label)]
        v, why = verdict_matches(a, b, tol)
        lines.append(f"- eq. (10) with the correction equals eq. (9): **{v}** "
                     f"({format_cell(a)} vs {format_cell(b)}; {why}).")
    return lines


def header(scale: Scale, paths: Paths, studies: list[Study]) -> str:
    runs = unique_runs(studies)
    done = [r for r in runs if status(r) in ("done", "diverged")]
    seconds = sum(run_seconds(r) or 0.0 for r in done)
    big = stored_large_kn(paths) or scale.large_kn
    return (f"Mode `{scale.name}`: Fashion-MNIST, {scale.train_examples:,} training and "
            f"{scale.val_examples:,} test images, {scale.model}, n={scale.bn_group}, "
            f"reference kn={scale.reference_kn} at η={scale.base_lr:g}, {scale.epochs:g} epochs "
            f"(warmup and decays × {scale.factor:.4g} of the paper's), ablations at "
            f"{f'kn={big}' if big else 'the kn the sweep will choose'}. Top-1 error: median of "
            "the last 5 "
            f"evaluations (the last 5/90 of each run), mean ± sample std over seeds. "
            f"{len(done)} of {len(runs)} runs finished, {seconds / 3600:.2f} h of run time"
            + (f" summed over runs ({scale.parallel} trained at once)." if scale.parallel > 1
               else ".")
            + "\n\n")


def write_reports(studies: list[Study], scale: Scale, paths: Paths,
                  only: set[str] | None = None, plots: bool = True) -> list[str]:
    """Rewrite the tables (and plots) of ``only`` (default: every study), summary.md,
    claims.md, and the snapshot section of the results README next to ``paths.results``."""
    from lsgd_jax.plotting import plot_runs

    results = paths.results
    os.makedirs(results, exist_ok=True)
    written, tables = [], []
    for study in studies:
        table, record = study_table(study, scale)
        tables.append(table)
        if only is not None and study.key not in only:
            continue
        for ext, text in (("md", table), ("json", json.dumps(record, indent=1) + "\n")):
            path = os.path.join(results, f"{study.key}.{ext}")
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
        ref = metrics_dir(study.reference)
        seed0 = [(row.label, metrics_dir(row.runs[0])) for row in study.rows
                 if row.runs[0] != study.reference]
        # A run that has just started has a metrics file but no training record yet.
        seed0 = [(label, w) for label, w in seed0 if read_metrics(w, "train")]
        if plots and seed0:
            written.append(plot_runs(
                [w for _, w in seed0], os.path.join(results, f"{study.key}.png"),
                labels=[label for label, _ in seed0],
                reference=ref if read_metrics(ref, "train") else None,
                title=f"{study.title}: {scale.model}, Fashion-MNIST "
                      f"{scale.train_examples:,} images, {scale.epochs:g} epochs (seed 0)"))
    text = header(scale, paths, studies)
    with open(os.path.join(results, "summary.md"), "w") as f:
        f.write(text + "\n".join(tables))
    with open(os.path.join(results, "claims.md"), "w") as f:
        f.write(text + "\n".join(claims(studies, scale)) + "\n")
    written += [os.path.join(results, "summary.md"), os.path.join(results, "claims.md")]
    readme = update_readme(os.path.join(os.path.dirname(os.path.abspath(results)), "README.md"),
                           "snapshot" if scale.name == "cpu" else f"snapshot {scale.name}",
                           text + "#### Claims\n\n" + "\n".join(claims(studies, scale))
                           + "\n\n" + "\n".join(tables))
    return written + ([readme] if readme else [])


def update_readme(path: str, marker: str, snapshot: str) -> str | None:
    """Replace the text between the ``marker`` comments of ``path`` (if it has them)."""
    begin, end = f"<!-- {marker} start -->", f"<!-- {marker} end -->"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{snapshot.strip()}\n{end}{tail}")
    return path


