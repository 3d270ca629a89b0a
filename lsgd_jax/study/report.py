"""The study's tables, verdicts, plots and the snapshot in the results README."""

from __future__ import annotations

import json
import math
import os

from lsgd_jax.study.definitions import (
    PAPER_EPOCHS,
    PAPER_REFERENCE_KN,
    PAPER_TRAIN_EXAMPLES,
    Paths,
    Scale,
    Study,
    stored_large_kn,
    unique_runs,
)
from lsgd_jax.study.runner import metrics_dir, run_error, run_seconds, status
from lsgd_jax.study.verdicts import (
    aggregate,
    difference,
    format_cell,
    verdict_matches,
    verdict_worse,
)
from lsgd_jax.training.metrics import read_metrics


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


def claim_items(studies: list[Study], scale: Scale) -> list[dict]:
    """One item per claim of the paper: its text, the verdict, the numbers that decide
    it and the compared rows' cells (``claim``, ``verdict``, ``why``, ``row``,
    ``against``); ``kind`` is "goal" (the reference's ≤ 10 %), "compare" or "pending"."""
    by_key = {s.key: s for s in studies}
    agg = {}
    for study in studies:
        for row in study.rows:
            agg[(study.key, row.label)] = aggregate([run_error(r) for r in row.runs])
    tol = scale.tolerance
    sweep = by_key["kn_sweep"]
    ref = agg[("kn_sweep", sweep.rows[0].label)]
    goal = "cannot tell yet" if ref["mean"] is None else "yes" if ref["mean"] <= 10.0 else "no"
    items = [dict(claim=f"The reference (kn={scale.reference_kn}) reaches at most 10 % top-1 "
                        "error", kind="goal", verdict=goal, why=format_cell(ref),
                  row=format_cell(ref), against="10 %")]

    def add(claim, a, b, judge):
        verdict, why = judge(a, b, tol)
        items.append(dict(claim=claim, kind="compare", verdict=verdict, why=why,
                          row=format_cell(a), against=format_cell(b)))

    for row in sweep.rows[1:]:
        k = int(row.runs[0].flag("--batch-size")) // scale.reference_kn
        add(f"Linear scaling + gradual warmup, k={k} ({row.label.split(',')[0]}) matches the "
            f"reference within {tol:g} points", agg[("kn_sweep", row.label)], ref,
            verdict_matches)
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
    for key, pairs in checks.items():
        if not scale.ablations:  # a sweep-only mode (long) makes no ablation claims
            break
        if key not in by_key:
            items.append(dict(claim=key, kind="pending", verdict="cannot tell yet",
                              row="not run yet", against="",
                              why="waits for the kn sweep to choose the ablations' kn"))
            continue
        rows = by_key[key].rows
        for i, j, text in pairs:
            add(text, agg[(key, rows[i].label)], agg[(key, rows[j].label)], verdict_worse)
    if "momentum" in by_key:
        rows = by_key["momentum"].rows
        add("eq. (10) with the correction equals eq. (9)", agg[("momentum", rows[2].label)],
            agg[("momentum", rows[3].label)], verdict_matches)
    return items


def claim_lines(items: list[dict]) -> list[str]:
    """The text form of :func:`claim_items`: one markdown line per claim."""
    lines = []
    for item in items:
        if item["kind"] == "goal":
            lines.append(f"- {item['claim']}: **{item['verdict']}** ({item['row']} %).")
        elif item["kind"] == "pending":
            lines.append(f"- {item['claim']}: {item['why']}.")
        else:
            lines.append(f"- {item['claim']}: **{item['verdict']}** ({item['row']} vs "
                         f"{item['against']}; {item['why']}).")
    return lines


def claims(studies: list[Study], scale: Scale) -> list[str]:
    """One line per claim of the paper: the verdict and the numbers that decide it."""
    return claim_lines(claim_items(studies, scale))


def claims_across_modes(root: str) -> str:
    """A markdown table of every claim's verdict in each mode whose ``claims.json`` is
    under ``root`` (the CPU mode first), for the results README."""
    modes = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "claims.json")
        if os.path.exists(path):
            with open(path) as f:
                modes.append(json.load(f))
    # The modes by budget: CPU (5 epochs), GPU (10), long (30).
    modes.sort(key=lambda m: (m["epochs"], m["mode"]))
    if not modes:
        return ""
    claims_in_order = list(dict.fromkeys(i["claim"] for m in modes for i in m["items"]))
    lines = ["| claim | " + " | ".join(m.get("label") or f"{m['mode'].upper()} mode "
                                      f"({m['epochs']:g} epochs)" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for claim in claims_in_order:
        cells = []
        for m in modes:
            item = next((i for i in m["items"] if i["claim"] == claim), None)
            cells.append("–" if item is None else f"**{item['verdict']}**: {item['row']}"
                         + (f"; {item['why']}" if item["kind"] == "compare" else ""))
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_points(root: str) -> list[dict]:
    """Every mode's sweep rows against the iteration budget: for each k > 1 of each mode
    whose ``kn_sweep.json`` is under ``root``, the iterations, the difference to that
    mode's reference and its two standard errors (None while seeds are missing)."""
    points = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "kn_sweep.json")
        claims = os.path.join(root, name, "claims.json")
        if not (os.path.exists(path) and os.path.exists(claims)):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        with open(claims) as f:
            mode = json.load(f)
        ref = rows[0]
        for row in rows[1:]:
            d = difference(row, ref)
            points.append({"mode": mode["mode"], "epochs": mode["epochs"],
                           "k": row["kn"] // ref["kn"], "kn": row["kn"],
                           "iterations": row["iterations"], "finished": row["finished"],
                           "diff": None if d is None else d["diff"],
                           "two_se": None if d is None else 2 * d["se"]})
    return sorted(points, key=lambda p: (p["k"], p["iterations"]))


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
    from lsgd_jax.artifacts.plotting import plot_runs

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
    items = claim_items(studies, scale)
    lines = "\n".join(claim_lines(items))
    with open(os.path.join(results, "claims.md"), "w") as f:
        f.write(text + lines + "\n")
    with open(os.path.join(results, "claims.json"), "w") as f:
        json.dump({"mode": scale.name, "epochs": scale.epochs, "label": scale.label,
                   "items": items}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    written += [os.path.join(results, name) for name in ("summary.md", "claims.md", "claims.json")]
    root = os.path.dirname(os.path.abspath(results))
    readme = os.path.join(root, "README.md")
    if plots and any(p["diff"] is not None for p in budget_points(root)):
        from lsgd_jax.artifacts.plotting import plot_budget

        written.append(plot_budget(budget_points(root), os.path.join(root, "critical_kn.png"),
                                   tolerance=scale.tolerance))
    updated = {update_readme(readme, "snapshot" if scale.name == "cpu"
                             else f"snapshot {scale.name}",
                             text + "#### Claims\n\n" + lines + "\n\n" + "\n".join(tables)),
               update_readme(readme, "claims", claims_across_modes(root))}
    return written + sorted(p for p in updated if p)


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


