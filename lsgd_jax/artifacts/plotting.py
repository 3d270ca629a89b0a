"""Training and validation curves of one or more runs, in the style of the paper's figures 2-4.

Reads ``WORKDIR/metrics.jsonl`` only, so it works on runs in progress and on
runs copied from a cluster. Needs matplotlib (the ``plot`` or ``test`` extra).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from lsgd_jax.training.metrics import current_records, eval_history, read_metrics


def _label(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def schedule_curve(workdir: str) -> tuple[list[float], list[float]] | None:
    """(epochs, rates) at every step of the run, from the run's ``config.json`` and the
    trainer's own schedule (``lsgd_jax.training.recipe.build_schedule``: the paper's step decay,
    or ``--schedule poly``); None when the run has no config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    import dataclasses
    import types

    import jax
    import numpy as np

    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.recipe import build_schedule

    with open(path) as f:
        saved = json.load(f)
    # "plan" since the Plan; "derived" in the config.json of earlier runs.
    config, plan = saved["config"], saved.get("plan") or saved["derived"]
    spe, total = plan["steps_per_epoch"], plan["total_steps"]
    # Keys of fields this version no longer has are dropped; missing ones take defaults.
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    run_config = TrainConfig.from_dict({k: v for k, v in config.items() if k in known})
    schedule = build_schedule(run_config, types.SimpleNamespace(
        global_batch_size=run_config.batch_size, steps_per_epoch=spe))
    steps = np.arange(total)
    # The rate step t runs with, drawn from t to t + 1 (a step function, as applied).
    rates = np.asarray(jax.vmap(schedule)(steps), np.float64)
    epochs = np.repeat(np.arange(total + 1) / spe, 2)[1:-1]
    return epochs.tolist(), np.repeat(rates, 2).tolist()


def _merge_short_windows(ordered: list[dict]) -> list[dict]:
    """Fold each logged window under half the usual length into the next one.

    The trainer closes its logging window at every checkpoint and evaluation, so
    an epoch can end with a window of one or two steps: its mean over a few
    batches is noise, and drawn as is it shows as a spike. A short window's
    values join the following window's (the run's last: the previous one's),
    weighted by steps, drawn at the later step. Window lengths are the gaps
    between logged steps.
    """
    if len(ordered) < 3:
        return ordered
    lengths = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + ordered, ordered)]
    usual = sorted(lengths)[len(lengths) // 2]
    merged: list[tuple[int, dict]] = []  # (steps covered, point)
    carry: list[tuple[int, dict]] = []
    for length, record in zip(lengths, ordered):
        carry.append((length, record))
        if 2 * length < usual and record is not ordered[-1]:
            continue  # too short: wait for the next window
        total = sum(n for n, _ in carry)
        if 2 * length < usual and merged:  # a short last window: back into the previous one
            previous_total, previous = merged.pop()
            carry.insert(0, (previous_total, previous))
            total += previous_total
        point = dict(record)
        for key in ("loss", "top1_error"):
            point[key] = sum(n * r[key] for n, r in carry) / total
        merged.append((total, point))
        carry = []
    return [point for _, point in merged]


def curves(workdir: str) -> dict[str, list[float]]:
    """Per-run series: train (epoch, loss, error) and validation (epoch, top-1 error).

    Training points are the logged windows, with any window under half the usual
    length folded into its neighbour (see :func:`_merge_short_windows`).
    """
    train = {}
    for r in read_metrics(workdir, "train"):
        train[r["step"]] = r  # a resumed run may log a step twice: keep the last
    ordered = _merge_short_windows([train[s] for s in sorted(train)])
    evals = list(eval_history(workdir).values())
    if not ordered and not evals:
        raise ValueError(f"{workdir} has no metrics.jsonl records; is it a training workdir?")
    results = current_records(workdir, "result")
    result = results[-1] if results and "median_top1_error" in results[-1] else None
    return {
        "result_error": 100 * result["median_top1_error"] if result else None,
        "result_epochs": list(result.get("median_eval_epochs", [])) if result else [],
        "train_epoch": [r["epoch"] for r in ordered],
        "train_loss": [r["loss"] for r in ordered],
        "train_error": [100 * r["top1_error"] for r in ordered],
        "lr": [r["lr"] for r in ordered],
        "eval_epoch": [r["epoch"] for r in evals],
        "eval_error": [100 * r["top1_error"] for r in evals],
    }


def consecutive_segments(epochs: Sequence[float]) -> list[tuple[int, int]]:
    """The pairs of neighbouring evaluations (indices) to join with a line: those no
    further apart than 1.5 times a neighbouring gap. A regular series (every epoch; the
    median's evaluations one 90th of the run apart) is joined; the gap between the two
    series, or a missing evaluation, is left open, where there is no data to draw.

    Example:
      >>> consecutive_segments([1.0, 1.91, 1.93, 1.96, 1.98, 2.0])
      [(1, 2), (2, 3), (3, 4), (4, 5)]
    """
    gaps = [b - a for a, b in zip(epochs, epochs[1:])]
    if len(gaps) == 1:
        return [(0, 1)]
    joined = []
    for i, gap in enumerate(gaps):
        neighbours = [g for g in (gaps[i - 1] if i else None,
                                  gaps[i + 1] if i + 1 < len(gaps) else None) if g is not None]
        if gap <= 1.5 * min(neighbours) + 1e-9:
            joined.append((i, i + 1))
    return joined


def _pyplot():
    """matplotlib's pyplot, off-screen; a missing ``plot`` extra is one line."""
    from lsgd_jax.training.extras import require

    require("plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_run(axes, results: list, smooth: int, workdir: str, label: str, **style) -> None:
    """One run's four panels (``plot_runs``); its result, if any, is appended to ``results``."""
    series = curves(workdir)

    def avg(xs):
        if smooth <= 1:
            return xs
        return [sum(xs[max(0, i - smooth + 1):i + 1]) / len(xs[max(0, i - smooth + 1):i + 1])
                for i in range(len(xs))]

    line, = axes[0].plot(series["train_epoch"], avg(series["train_error"]), label=label,
                         **style)
    style = dict(style, color=line.get_color())
    axes[1].plot(series["train_epoch"], avg(series["train_loss"]), **style)
    xs, ys = series["eval_epoch"], series["eval_error"]
    axes[2].plot(xs, ys, marker="o", markersize=4, linestyle="none", **style)
    for i, j in consecutive_segments(xs):  # no line across a gap without evaluations
        axes[2].plot([xs[i], xs[j]], [ys[i], ys[j]], **style)
    if series["result_error"] is not None:
        _mark_result(axes[2], series, style, results)
    schedule = schedule_curve(workdir)
    if schedule is not None:
        axes[3].plot(*schedule, **style)
    else:  # no config.json: the logged rates, as points
        axes[3].plot(series["train_epoch"], series["lr"], marker=".", linestyle="none",
                     **style)


def _mark_result(ax, series: dict, style: dict, results: list) -> None:
    """The paper's metric on the validation panel: the evaluations it takes the median of,
    circled, and the result drawn across them, labelled at the right."""
    xs, ys = series["eval_epoch"], series["eval_error"]
    marked = [(x, y) for x, y in zip(xs, ys)
              if any(abs(x - e) < 1e-3 for e in series["result_epochs"])]
    ax.plot([x for x, _ in marked], [y for _, y in marked], marker="o", markersize=9,
            markerfacecolor="none", linestyle="none", color=style["color"])
    low, high = (min(series["result_epochs"]), max(series["result_epochs"])) if (
        series["result_epochs"]) else (xs[-1], xs[-1])
    ax.hlines(series["result_error"], low, high, colors=style["color"], linestyles="--",
              linewidth=1.5)
    # Labels stacked at the right, each with a leader to its run's result.
    ax.annotate(f"result {series['result_error']:.2f}%", (high, series["result_error"]),
                textcoords="axes fraction", xytext=(0.97, 0.55 - 0.09 * len(results)),
                ha="right", va="center", fontsize=9, color=style["color"],
                arrowprops=dict(arrowstyle="-", color=style["color"], lw=0.8))
    results.append(series["result_error"])


def plot_runs(workdirs: Sequence[str], output: str | None = None, *,
              labels: Sequence[str] | None = None, reference: str | None = None,
              title: str | None = None, smooth: int = 1) -> str:
    """Write a PNG with training error, training loss, validation error and the rate.

    Args:
      workdirs: run directories.
      output: the PNG path (default: ``curves.png`` in the first run's directory).
      labels: the runs' names in the legend, drawn when there are several (default:
        directory names).
      reference: a run drawn in black underneath the others (the paper overlays
        every large-minibatch curve on the kn = 256 reference); listed once in the
        legend even when it is also one of ``workdirs``.
      title: figure title (default: the run's name, or "N runs").
      smooth: moving-average window over logged training points.

    The rate is drawn at every step from the run's schedule (``config.json``),
    not from the logged points. Validation results are points, joined only where they
    are consecutive (:func:`consecutive_segments`); the evaluations of the paper's
    metric are circled and the result (their median) drawn across them.
    """
    plt = _pyplot()

    labels = list(labels) if labels else [_label(w) for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    if output is None:
        output = os.path.join(workdirs[0], "curves.png")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))

    results: list[float] = []
    if reference is not None:
        _draw_run(axes, results, smooth, reference, f"{_label(reference)} (reference)",
                  color="black", linewidth=2, alpha=0.6)
    for workdir, label in zip(workdirs, labels):
        if reference is not None and os.path.realpath(workdir) == os.path.realpath(reference):
            continue  # already drawn, once, as the reference
        _draw_run(axes, results, smooth, workdir, label, linewidth=1.2)
    for ax, name in zip(axes, ("training top-1 error (%)", "training loss",
                               "validation top-1 error (%)", "learning rate")):
        ax.set_xlabel("epochs")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[3].set_yscale("log")  # the ×0.1 decays as equal steps
    if results:  # what the marks of the validation panel mean
        from matplotlib.lines import Line2D

        axes[2].legend(handles=[
            Line2D([], [], color="grey", marker="o", markersize=4, linestyle="none",
                   label="evaluation"),
            Line2D([], [], color="grey", marker="o", markersize=9, markerfacecolor="none",
                   linestyle="none", label="the paper's metric's evaluations"),
            Line2D([], [], color="grey", linestyle="--", label="result: their median")],
            fontsize=8, loc="upper right")
    handles, names = axes[0].get_legend_handles_labels()
    runs = [_label(w) for w in ([reference] if reference else []) + list(workdirs)]
    runs = list(dict.fromkeys(runs))  # each run once, in order
    if title is None:
        title = runs[0] if len(runs) == 1 else f"{len(names)} runs"
    # A legend names the runs where there are several; one run's name is the title.
    rows = 0
    if len(names) > 1:
        longest = max((len(n) for n in names), default=1)
        ncol = max(1, min(len(names), 6, 200 // max(longest, 1)))
        rows = -(-len(names) // ncol)
        fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(title)
    legend = 0.2 + 0.2 * rows if rows else 0.1  # inches: rows of 9-point text, a margin
    height = 4.25 + legend       # the panels keep their height whatever the legend's
    fig.set_size_inches(20, height)
    fig.tight_layout(rect=(0, legend / height, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_budget(points: Sequence[dict], output: str, *, tolerance: float) -> str:
    """The critical kn against the iteration budget: for each k, the difference of its top-1
    error to the reference (points, ± two standard errors) against its number of
    iterations, one marker per mode of the study (``lsgd_jax.study.report.budget_points``).
    A k matches where its whole bar lies under ``tolerance``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5))
    markers = {}
    for k in sorted({p["k"] for p in points}):
        mine = [p for p in points if p["k"] == k and p["diff"] is not None]
        if not mine:
            continue
        xs = [p["iterations"] for p in mine]
        line, = ax.plot(xs, [p["diff"] for p in mine], linewidth=1, label=f"k = {k}")
        for p in mine:
            marker = markers.setdefault(p["mode"], "osD^v"[len(markers) % 5])
            ax.errorbar(p["iterations"], p["diff"], yerr=p["two_se"], color=line.get_color(),
                        marker=marker, markersize=6, capsize=3)
    ax.axhline(tolerance, color="grey", linestyle="--", linewidth=1,
               label=f"τ = {tolerance:g} points (matches below)")
    ax.axhline(0, color="black", linewidth=0.6)
    for mode, marker in markers.items():
        epochs = next(p["epochs"] for p in points if p["mode"] == mode)
        ax.plot([], [], color="grey", marker=marker, linestyle="none",
                label=f"{mode} mode ({epochs:g} epochs)")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)  # ±1 point linear, the breaks (tens) compressed
    ax.set_xlabel("iterations of the run (log)")
    ax.set_ylabel("top-1 error − reference's (points, ± 2 SE)")
    ax.set_title("Where linear scaling + warmup matches, by iteration budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the bars
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
