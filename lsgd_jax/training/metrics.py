"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard, and the console.

Only process 0 writes files; every process may print. ``metrics.jsonl`` has one
JSON object per line, each with a ``kind`` ("train", "eval", "checkpoint",
"result", "start", "restart"), so a run's history is readable with nothing but
``json``. A ``restart`` record (``--restart-from-scratch``) starts a new attempt in
the same file: the records before it are kept, and the readers of a run's current
state (:func:`current_records`, :func:`eval_history`) look only after it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterable

import lsgd_jax.base.checks as checks


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy and jax scalars become Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class MetricsWriter:
    """Appends records to ``WORKDIR/metrics.jsonl`` and TensorBoard scalars.

    Args:
      guard: called before every record; when it raises (the run lost its workdir),
        the error propagates and the writer writes nothing more.
      log: where the one warning about a torn last line goes.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
                 guard: Callable[[], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._guard = guard
        self._tb = None
        if enabled:
            end_torn_line(self.path, log)
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: the run goes on without TensorBoard
                print("warning: tensorboardX is not installed, so TensorBoard scalars are off "
                      "(metrics.jsonl has every figure); install it with: pip install -e .",
                      file=sys.stderr)
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        if self._guard is not None:
            try:
                self._guard()
            except BaseException:
                self.enabled = False  # and nothing more, from any cleanup that follows
                raise
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and kind in ("train", "eval"):
            for name, value in values.items():
                if checks.is_real(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError:  # a full disk: the run's own error says so; nothing more to do
                pass

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError:
                pass
            self._tb = None


def end_torn_line(path: str, log: Callable[[str], None] | None = None) -> bool:
    """End a last line cut short by a crash with a newline, so that the next record
    starts a line of its own; the torn line is kept (and skipped when read).
    Returns whether there was one."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
            f.write(b"\n")
    except FileNotFoundError:
        return False
    if log is not None:
        log(f"warning: the last line of {path} was cut short (a crash while writing it); it "
            "is kept, ended with a newline, and skipped when the records are read")
    return True


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl`` (of one ``kind`` if given).

    A line cut short by a crash is skipped.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


def current_records(workdir: str, kind: str | None = None) -> list[dict]:
    """The records of the run's current attempt: those after its last ``restart``."""
    records = read_metrics(workdir)
    restarts = [i for i, r in enumerate(records) if r.get("kind") == "restart"]
    if restarts:
        records = records[restarts[-1] + 1:]
    return [r for r in records if kind is None or r.get("kind") == kind]


def eval_history(workdir: str) -> dict[int, dict]:
    """Eval records of the current attempt by step, in step order; the latest one where
    a resumed run evaluated a step twice. Keyed by step, not epoch: a run evaluates
    several times within an epoch (the median's evaluations, a fractional last epoch).
    Records of ``lsgd-jax evaluate`` (``source: "evaluate"``) are not the run's own."""
    history = {int(r["step"]): r for r in current_records(workdir, "eval")
               if r.get("source") != "evaluate"}  # the run's own, not later read-backs
    return dict(sorted(history.items()))


def paper_error(top1_errors: Iterable[float], last: int = 5) -> float:
    """The paper's reported figure: the median of the last 5 epochs' top-1 error."""
    values = list(top1_errors)[-last:]
    if not values:
        raise ValueError("no validation results to report")
    return statistics.median(values)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plural(count: int, noun: str) -> str:
    """``"1 process"``, ``"2 processes"``: a count with its noun in the right number."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{count} {noun}s"
