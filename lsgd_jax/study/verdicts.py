"""Verdicts on the paper's claims from runs over seeds: "matches", "is worse", or cannot tell.

A row is the paper's figure (median top-1 error, in %) of one setting over seeds;
:func:`aggregate` summarises it (mean ± sample std, counting diverged and missing
runs). Two rows differ by d = mean(a) − mean(b) with a standard error pooled from
the seeds' sample variances; the interval d ± 2·SE decides:

* ``verdict_matches(a, ref, τ)``: "matches" when d + 2·SE ≤ τ, "does not match"
  when d − 2·SE > τ, else "cannot tell (spread too large)";
* ``verdict_worse(a, b, τ)`` (the paper's "a is worse than b"): "reproduces" when
  d − 2·SE > 0, "does not reproduce" when d + 2·SE < τ, else cannot tell.
"""

from __future__ import annotations

import math
import statistics


def aggregate(values: list[float | str | None]) -> dict:
    """Mean ± sample std over the finished seeds; diverged and missing runs are counted."""
    finished = [v for v in values if isinstance(v, float)]
    return {
        "mean": statistics.fmean(finished) if finished else None,
        "std": statistics.stdev(finished) if len(finished) > 1 else None,
        "values": finished,
        "finished": len(finished),
        "diverged": sum(v == "diverged" for v in values),
        "missing": sum(v is None for v in values),
        "seeds": len(values),
    }


def format_cell(agg: dict) -> str:
    if agg["finished"] == 0:
        return "diverged" if agg["diverged"] else "not run yet"
    text = f"{agg['mean']:.2f}"
    if agg["std"] is not None:
        text += f" ± {agg['std']:.2f}"
    notes = [f"{agg['finished']}/{agg['seeds']} seeds"]
    if agg["diverged"]:
        notes.append(f"{agg['diverged']} diverged")
    return f"{text} ({', '.join(notes)})"


def difference(a: dict, b: dict) -> dict | None:
    """Mean of ``a`` minus mean of ``b`` (percentage points) with a 2-standard-error interval.

    The standard error pools the seeds' sample variances; a row with one seed borrows
    the other row's variance. None when either row has no finished seed or neither has two.
    """
    if not a["finished"] or not b["finished"] or (a["std"] is None and b["std"] is None):
        return None
    va = a["std"] ** 2 if a["std"] is not None else b["std"] ** 2
    vb = b["std"] ** 2 if b["std"] is not None else a["std"] ** 2
    d = a["mean"] - b["mean"]
    se = math.sqrt(va / a["finished"] + vb / b["finished"])
    return {"diff": d, "se": se, "low": d - 2 * se, "high": d + 2 * se}


CANNOT_TELL = "cannot tell (spread too large)"


def _judge(a: dict, b: dict, if_diverged: str, decide) -> tuple[str, str]:
    """A verdict on row ``a`` against row ``b``, and the numbers that decide it."""
    if a["finished"] == 0 and a["diverged"]:
        return if_diverged, "diverged"
    d = difference(a, b)
    if d is None:
        return "cannot tell yet", "not enough finished seeds"
    return decide(d), f"{d['diff']:+.2f} ± {2 * d['se']:.2f} points"


def verdict_matches(a: dict, ref: dict, tolerance: float) -> tuple[str, str]:
    """Does row ``a`` match the reference: worse by at most ``tolerance`` points?"""
    return _judge(a, ref, "does not match", lambda d: (
        "matches" if d["high"] <= tolerance
        else "does not match" if d["low"] > tolerance else CANNOT_TELL))


def verdict_worse(a: dict, b: dict, tolerance: float) -> tuple[str, str]:
    """Is row ``a`` worse than row ``b``, as the paper finds?"""
    return _judge(a, b, "reproduces", lambda d: (
        "reproduces" if d["low"] > 0
        else "does not reproduce" if d["high"] < tolerance else CANNOT_TELL))
