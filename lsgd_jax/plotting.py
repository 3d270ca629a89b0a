"""Training and validation curves of one or more runs, in the style of the paper's figures 2-4.

Reads ``WORKDIR/metrics.jsonl`` only, so it works on runs in progress and on
runs copied from a cluster. Needs matplotlib (the ``plot`` or ``test`` extra).
"""

from __future__ import annotations

import os
from typing import Sequence

from lsgd_jax.metrics import eval_history, read_metrics


def _label(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def curves(workdir: str) -> dict[str, list[float]]:
    """Per-run series: train (epoch, loss, error) and validation (epoch, top-1 error)."""
    train = {}
    for r in read_metrics(workdir, "train"):
        train[r["step"]] = r  # a resumed run may log a step twice: keep the last
    ordered = [train[s] for s in sorted(train)]
    evals = list(eval_history(workdir).values())
    if not ordered and not evals:
        raise ValueError(f"{workdir} has no metrics.jsonl records; is it a training workdir?")
    return {
        "train_epoch": [r["epoch"] for r in ordered],
        "train_loss": [r["loss"] for r in ordered],
        "train_error": [100 * r["top1_error"] for r in ordered],
        "lr": [r["lr"] for r in ordered],
        "eval_epoch": [r["epoch"] for r in evals],
        "eval_error": [100 * r["top1_error"] for r in evals],
    }


def plot_runs(workdirs: Sequence[str], output: str, *, labels: Sequence[str] | None = None,
              reference: str | None = None, title: str | None = None,
              smooth: int = 1) -> str:
    """Write a PNG with training error, training loss, validation error and the rate.

    Args:
      workdirs: run directories.
      output: the PNG path.
      labels: legend names (default: directory names).
      reference: a run drawn in black underneath the others (the paper overlays
        every large-minibatch curve on the kn = 256 reference).
      title: figure title.
      smooth: moving-average window over logged training points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [_label(w) for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))

    def draw(series, label, **style):
        def avg(xs):
            if smooth <= 1:
                return xs
            return [sum(xs[max(0, i - smooth + 1):i + 1]) / len(xs[max(0, i - smooth + 1):i + 1])
                    for i in range(len(xs))]

        axes[0].plot(series["train_epoch"], avg(series["train_error"]), label=label, **style)
        axes[1].plot(series["train_epoch"], avg(series["train_loss"]), label=label, **style)
        axes[2].plot(series["eval_epoch"], series["eval_error"], marker=".", label=label, **style)
        axes[3].plot(series["train_epoch"], series["lr"], label=label, **style)

    if reference is not None:
        draw(curves(reference), f"{_label(reference)} (reference)", color="black", linewidth=2,
             alpha=0.6)
    for workdir, label in zip(workdirs, labels):
        draw(curves(workdir), label, linewidth=1.2)
    for ax, name in zip(axes, ("training error (%)", "training loss", "validation error (%)",
                               "learning rate")):
        ax.set_xlabel("epochs")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
