"""Beyond the paper's limit: LARS and the later large-batch recipe, with equal tuning.

Where the paper's recipe breaks at this budget (CPU mode: kn = 512 is 6.4 points
worse than the reference, kn = 1,024 far worse), three recipes are compared at the
same kn, model, data, epochs and warmup:

* ``paper``: the paper's (momentum SGD, step decay);
* ``nado``: the paper's with a polynomial decay (power 2) and label smoothing 0.1,
  the control of Nado et al. 2021 (no LARS);
* ``lars``: LARS (trust coefficient 0.001) with that same schedule and smoothing.

Equal tuning: each recipe gets the same 3-point grid, its centre peak rate × ½, 1
and 2, on seed 0; the best of the three (lowest error; a diverged run is the worst)
then runs seeds 1 and 2. The centre is linear scaling, η·k, for ``paper`` and
``nado``. For ``lars`` it is the rate at which a LARS step turns a kernel by as much
as momentum SGD with weight decay does in its equilibrium, √(2·η·k·λ / (1 + m)) per
step (Wan et al. 2021, spherical motion dynamics), i.e. η_L = √(2ηkλ/(1+m)) / η_tc:
about 18 at kn = 512 and 26 at kn = 1,024. The verdict rules are the study's
(``lsgd_jax.study.verdicts``); the reference is the sweep's kn = 16 (3 seeds).
"""

from __future__ import annotations

import json
import math
import os

from lsgd_jax.study.definitions import Paths, Row, Run, Scale, Study, _run
from lsgd_jax.study.runner import metrics_dir, run_error
from lsgd_jax.study.verdicts import aggregate, format_cell, verdict_matches, verdict_worse

ARMS = ("paper", "nado", "lars")
ARM_LABELS = {"paper": "the paper's recipe",
              "nado": "paper's + poly decay + label smoothing (Nado control)",
              "lars": "LARS + poly decay + label smoothing"}
MULTIPLIERS = (0.5, 1.0, 2.0)
LABEL_SMOOTHING = 0.1
POLY_POWER = 2
END_LR = 1e-4
TRUST_COEFFICIENT = 0.001
WEIGHT_DECAY, MOMENTUM = 1e-4, 0.9  # the trainer's defaults, which every run uses
SEEDS_AFTER = (1, 2)


def centre_peak(scale: Scale, arm: str, kn: int) -> float:
    """The grid's centre: η·k, or for LARS √(2·η·k·λ/(1+m)) / η_tc (see the module)."""
    peak = scale.base_lr * kn / scale.reference_kn
    if arm == "lars":
        return math.sqrt(2 * peak * WEIGHT_DECAY / (1 + MOMENTUM)) / TRUST_COEFFICIENT
    return peak


def grid_run(scale: Scale, paths: Paths, arm: str, kn: int, multiplier: float,
             seed: int) -> Run:
    """One run of the grid; the paper's recipe at × 1 is the sweep's own run of that kn."""
    if arm == "paper" and multiplier == 1.0:
        return _run(scale, paths, f"kn{kn}", seed, kn=kn)
    base = centre_peak(scale, arm, kn) * multiplier * scale.reference_kn / kn
    run = _run(scale, paths, f"beyond_kn{kn}_{arm}_x{multiplier:g}", seed, kn=kn, base_lr=base)
    extra: tuple[tuple[str, str], ...] = ()
    if arm in ("nado", "lars"):
        extra += (("--schedule", "poly"), ("--poly-power", f"{POLY_POWER:g}"),
                  ("--end-lr", f"{END_LR:g}"), ("--label-smoothing", f"{LABEL_SMOOTHING:g}"))
    if arm == "lars":
        extra += (("--optimizer", "lars"), ("--trust-coefficient", f"{TRUST_COEFFICIENT:g}"))
    return Run(run.name, run.flags + extra, run.record)


def _score(run: Run) -> float | None:
    error = run_error(run)
    return math.inf if error == "diverged" else error


def best_multiplier(scale: Scale, paths: Paths, arm: str, kn: int) -> float | None:
    """The grid point with the lowest seed-0 error; None until all three are finished."""
    scores = [_score(grid_run(scale, paths, arm, kn, m, 0)) for m in MULTIPLIERS]
    if any(s is None for s in scores):
        return None
    # Ties (all diverged, say) go to the centre, then to the smaller rate.
    return min(zip(scores, (abs(math.log(m)) for m in MULTIPLIERS), MULTIPLIERS))[2]


def at_edge(multiplier: float) -> bool:
    """A best rate at the smallest or largest grid point: the optimum was not bracketed,
    and a wider grid might have done better."""
    return multiplier in (MULTIPLIERS[0], MULTIPLIERS[-1])


def reference_row(scale: Scale, paths: Paths) -> Row:
    return Row(f"kn={scale.reference_kn} (reference)",
               tuple(_run(scale, paths, f"kn{scale.reference_kn}", s, kn=scale.reference_kn)
                     for s in scale.seeds), "23.60 ± 0.12")


def define_beyond(scale: Scale, paths: Paths) -> list[Study]:
    """The grid on seed 0, and the best rate of each recipe over 3 seeds once it is known."""
    ref = reference_row(scale, paths)
    grid, best = [ref], [ref]
    for kn in scale.beyond_kn:
        for arm in ARMS:
            centre = centre_peak(scale, arm, kn)
            for m in MULTIPLIERS:
                grid.append(Row(f"kn={kn}, {ARM_LABELS[arm]}, peak {centre * m:.3g} (×{m:g})",
                                (grid_run(scale, paths, arm, kn, m, 0),), "–"))
            chosen = best_multiplier(scale, paths, arm, kn)
            if chosen is not None:
                edge = ", at the grid's edge" if at_edge(chosen) else ""
                best.append(Row(f"kn={kn}, {ARM_LABELS[arm]}, best peak {centre * chosen:.3g} "
                                f"(×{chosen:g}{edge})",
                                tuple(grid_run(scale, paths, arm, kn, chosen, s)
                                      for s in (0,) + SEEDS_AFTER), "–"))
    return [Study("beyond_grid", "Beyond the paper's limit: the 3-rate grid of each recipe "
                  "(seed 0)", tuple(grid), ref.runs[0]),
            Study("beyond", "Beyond the paper's limit: the best rate of each recipe (3 seeds)",
                  tuple(best), ref.runs[0])]


def arm_of(run: Run) -> str:
    """Which recipe a run is, from its flags."""
    flags = dict(run.flags)
    if flags.get("--optimizer") == "lars":
        return "lars"
    return "nado" if flags.get("--schedule") == "poly" else "paper"


def _best_rows(studies: list[Study]) -> dict[tuple[int, str], Row]:
    return {(int(row.runs[0].flag("--batch-size")), arm_of(row.runs[0])): row
            for row in studies[1].rows[1:]}


def largest_matching(verdicts: dict[int, str]) -> int:
    """The largest kn whose verdict is "matches"; 0 when none does."""
    return max((kn for kn, v in verdicts.items() if v == "matches"), default=0)


def moved(verdicts: dict[str, dict[int, str]], arm: str) -> tuple[str, str]:
    """Did ``arm`` move the largest kn that matches the reference beyond the paper's recipe?

    "yes" when ``arm`` matches at a larger kn than the paper's recipe does; "no" when,
    at every kn above the paper's largest, ``arm`` does not match; else cannot tell."""
    if any(v == "cannot tell yet" for a in ("paper", arm) for v in verdicts[a].values()):
        return "cannot tell yet", "waits for the grid and the seeds"
    paper, other = largest_matching(verdicts["paper"]), largest_matching(verdicts[arm])
    where = lambda kn: f"kn={kn}" if kn else "none of the section's kn"  # noqa: E731
    why = f"it matches at {where(other)}, the paper's recipe at {where(paper)}"
    if other > paper:
        return "yes", why
    above = [v for kn, v in verdicts[arm].items() if kn > paper]
    if all(v == "does not match" for v in above):
        return "no", why
    return "cannot tell (spread too large)", why


def beyond_claim_items(studies: list[Study], scale: Scale) -> list[dict]:
    """The section's claims: each recipe against the reference at each kn, LARS against
    the others, and whether LARS (or the Nado control) moved the largest matching kn."""
    tol = scale.tolerance
    ref = aggregate([run_error(r) for r in studies[1].rows[0].runs])
    rows = _best_rows(studies)
    aggs = {key: aggregate([run_error(r) for r in row.runs]) for key, row in rows.items()}
    items, verdicts = [], {arm: {} for arm in ARMS}
    for kn in scale.beyond_kn:
        for arm in ARMS:
            claim = (f"{ARM_LABELS[arm]} (best of 3 rates) at kn={kn} matches the reference "
                     f"within {tol:g} points")
            if (kn, arm) not in aggs:
                verdicts[arm][kn] = "cannot tell yet"
                items.append(dict(claim=claim, kind="pending", verdict="cannot tell yet",
                                  row="not run yet", against="",
                                  why="waits for the 3-rate grid on seed 0"))
                continue
            verdict, why = verdict_matches(aggs[(kn, arm)], ref, tol)
            verdicts[arm][kn] = verdict
            items.append(dict(claim=claim, kind="compare", verdict=verdict, why=why,
                              row=format_cell(aggs[(kn, arm)]), against=format_cell(ref)))
        for other, text in (("paper", "the paper's recipe"), ("nado", "the Nado control")):
            claim = f"LARS beats {text} at kn={kn}"
            if (kn, "lars") in aggs and (kn, other) in aggs:
                verdict, why = verdict_worse(aggs[(kn, other)], aggs[(kn, "lars")], tol)
                items.append(dict(claim=claim, kind="compare", verdict=verdict, why=why,
                                  row=format_cell(aggs[(kn, "lars")]),
                                  against=format_cell(aggs[(kn, other)])))
            else:
                items.append(dict(claim=claim, kind="pending", verdict="cannot tell yet",
                                  row="not run yet", against="",
                                  why="waits for the 3-rate grid on seed 0"))
    edges = {(kn, arm): row.label for (kn, arm), row in rows.items()
             if "at the grid's edge" in row.label}
    for arm, text in (("lars", "LARS"), ("nado", "poly decay + label smoothing, without LARS,")):
        verdict, why = moved(verdicts, arm)
        unbracketed = [f"{ARM_LABELS[a]} at kn={kn}" for (kn, a) in sorted(edges)
                       if a in ("paper", arm)]
        if unbracketed:
            why += ("; the best rate was at the edge of its grid for "
                    + ", ".join(unbracketed) + ", so a wider grid might change this")
        items.append(dict(claim=f"At this budget, with equal tuning, {text} moved the largest "
                                "kn that matches the reference", kind="outcome",
                          verdict=verdict, why=why, row=verdict, against=""))
    return items


def beyond_claim_lines(items: list[dict]) -> list[str]:
    lines = []
    for item in items:
        if item["kind"] == "pending":
            lines.append(f"- {item['claim']}: {item['why']}.")
        elif item["kind"] == "outcome":
            lines.append(f"- {item['claim']}: **{item['verdict']}** ({item['why']}).")
        else:
            lines.append(f"- {item['claim']}: **{item['verdict']}** ({item['row']} vs "
                         f"{item['against']}; {item['why']}).")
    return lines


def write_beyond_reports(studies: list[Study], scale: Scale, paths: Paths,
                         plots: bool = True) -> list[str]:
    """The section's tables, claims and plot, and its part of the results README."""
    from lsgd_jax.artifacts.plotting import plot_runs
    from lsgd_jax.study.report import study_table, update_readme
    from lsgd_jax.training.metrics import read_metrics

    os.makedirs(paths.results, exist_ok=True)
    written, tables = [], []
    for study in studies:
        table, record = study_table(study, scale)
        tables.append(table)
        for ext, text in (("md", table), ("json", json.dumps(record, indent=1) + "\n")):
            path = os.path.join(paths.results, f"{study.key}.{ext}")
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
    items = beyond_claim_items(studies, scale)
    lines = "\n".join(beyond_claim_lines(items))
    for name, text in (("beyond_claims.md", lines + "\n"),
                       ("beyond_claims.json", json.dumps(
                           {"mode": scale.name, "epochs": scale.epochs, "items": items},
                           indent=1, ensure_ascii=False) + "\n")):
        path = os.path.join(paths.results, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    seed0 = [(row.label, metrics_dir(row.runs[0])) for row in studies[1].rows[1:]]
    seed0 = [(label, w) for label, w in seed0 if read_metrics(w, "train")]
    ref = metrics_dir(studies[1].reference)
    if plots and seed0:
        written.append(plot_runs(
            [w for _, w in seed0], os.path.join(paths.results, "beyond.png"),
            labels=[label for label, _ in seed0],
            reference=ref if read_metrics(ref, "train") else None,
            title=f"Beyond the paper's limit: {scale.model}, {scale.epochs:g} epochs (seed 0)"))
    readme = os.path.join(os.path.dirname(os.path.abspath(paths.results)), "README.md")
    marker = "beyond" if scale.name == "cpu" else f"beyond {scale.name}"
    updated = update_readme(readme, marker, "#### Claims\n\n" + lines + "\n\n"
                            + "\n".join(tables))
    return written + ([updated] if updated else [])
