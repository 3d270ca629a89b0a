"""What the training loop writes, step by step: ``LogWindow`` (averaged training metrics:
the console, ``metrics.jsonl``, TensorBoard) and ``Saver`` (verified asynchronous
checkpoints, and a ``checkpoint`` record for each once it is complete on disk).

Both take the run (``lsgd_jax.training.run.Run``) they write for; neither starts a
collective except where every process calls it at the same point.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from lsgd_jax.parallel.agreement import from_process_0
from lsgd_jax.training.checkpoint import CheckpointSaveError, state_sha256
from lsgd_jax.training.metrics import MetricsWriter, format_duration

if TYPE_CHECKING:
    from lsgd_jax.training.run import Run


class NonFiniteError(FloatingPointError):
    """The loss, a gradient or the updated state was not finite; the run stops without saving it."""


class LogWindow:
    """Training metrics since the last log line: checked, averaged, written, printed."""

    def __init__(self, run: Run, writer: MetricsWriter, start_step: int):
        self.run, self.writer = run, writer
        self.values: list[dict] = []
        self.start_step, self.t_start, self.t_window = start_step, time.time(), time.time()
        self.input_wait, self.waited = (lambda: 0.0), 0.0  # seconds blocked on the input so far

    def restart(self, step: int, t_window: float) -> None:
        """After the first step: the ETA counts only the steps after it."""
        self.start_step, self.t_start, self.t_window = step, time.time(), t_window
        self.waited = self.input_wait()

    def add(self, step_done: int, metrics) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not values.pop("finite"):
            lr = float(self.run.schedule(step_done - 1))
            raise NonFiniteError(
                f"non-finite loss, gradient or updated state at step {step_done} (learning "
                f"rate {lr:g}, loss {values['loss']}); the state was not updated with it and no "
                f"checkpoint holds it; the latest checkpoint is step "
                f"{self.run.ckpts.latest_step()}. Lower --base-lr or lengthen --warmup-epochs.")
        self.values.append(values)

    def emit(self, step: int) -> None:
        if not self.values:
            return
        plan, now = self.run.plan, time.time()
        mean = {k: float(np.mean([w[k] for w in self.values])) for k in self.values[0]}
        rate = len(self.values) * plan.global_batch_size / max(now - self.t_window, 1e-9)
        eta = ("ETA after the next steps" if step == self.start_step else "ETA " + format_duration(
            (now - self.t_start) / (step - self.start_step) * (plan.total_steps - step)))
        lr = float(self.run.schedule(step - 1))
        spe = plan.steps_per_epoch
        waited, self.waited = self.waited, self.input_wait()
        wait = min(1.0, (self.waited - waited) / max(now - self.t_window, 1e-9))
        self.writer.write("train", step, epoch=step / spe, lr=lr, images_per_second=rate,
                          input_wait_fraction=wait, **mean)
        self.run.log(f"step {step}/{plan.total_steps} epoch {step / spe:.2f} | loss "
                     f"{mean['loss']:.4f} top-1 error {100 * mean['top1_error']:.2f}% | "
                     f"lr {lr:.4g} | "
                     f"{rate:,.0f} img/s | {'input-bound: ' if wait >= 0.1 else ''}"
                     f"{100 * wait:.0f} % of the time waiting for data | {eta}")
        self.values.clear()
        self.t_window = now


def saved_line(directory: str, step: int, seconds: float) -> str:
    """The console line of a checkpoint complete on disk; its time when over a second. The
    save is asynchronous and found complete at the next check: the time is an upper bound."""
    took = f" in at most {seconds:.1f} s" if seconds > 1 else ""
    return f"checkpoint saved: step {step}{took} ({directory}/{step})"


class Saver:
    """Verified, asynchronous checkpoints; a ``checkpoint`` record once each is on disk."""

    def __init__(self, run: Run, writer: MetricsWriter):
        self.run, self.writer = run, writer
        self.pending: list[tuple[int, str, float]] = []  # step, SHA-256, start time

    def save(self, step: int, state, position) -> None:
        try:  # the step's guard keeps the state finite; never write one that is not
            digest = state_sha256(state, require_finite=True)
        except FloatingPointError as e:
            raise NonFiniteError(f"{e} at step {step}; not saved. Lower --base-lr.") from None
        self.run.check_lock()  # a run that lost its workdir saves nothing into it
        started = time.time()
        # Orbax waits for the previous save before it starts this one anyway: check and
        # record that one now, before this save's retention policy may delete it.
        self.record_committed(wait=True)
        self.run.ckpts.save(step, state, position={"position": position.to_dict()},
                            meta={"config": self.run.config.to_dict(), "state_sha256": digest,
                                  "data": self.run.data})
        self.pending.append((step, digest, started))

    def record_committed(self, wait: bool = False) -> None:
        """Record each finished save, once its step is complete on disk.

        ``wait=True`` (before each save, and at the end; every process calls it at the
        same point): wait for the saves in progress, check them all, and agree. Else
        process 0 alone records the saves it finds complete, with no collective, and
        leaves the rest for the next ``wait=True``.

        Raises:
          CheckpointSaveError: a save ended without a complete checkpoint (orbax
            logs such a failure and goes on; the run must not).
        """
        is_main = jax.process_index() == 0
        if not wait:
            if is_main and self.pending and not self.run.ckpts.saving():
                self._record_complete(final=False)
            return
        failure = ""
        if self.pending or jax.process_count() > 1:
            try:
                self.run.ckpts.wait()
            except Exception as e:  # orbax re-raises its save thread's error, sometimes
                text = str(e).strip()
                failure = f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else (
                    type(e).__name__)
        error = self._record_complete(final=True, failure=failure) if is_main else ""
        self.pending.clear()
        error = from_process_0(error)
        if error:
            raise CheckpointSaveError(error)

    def _record_complete(self, *, final: bool, failure: str = "") -> str:
        """Write the records of the pending saves that are complete; returns the error of
        the first that is not (kept pending), or "" (process 0 only)."""
        while self.pending:
            saved, digest, started = self.pending[0]
            missing = self.run.ckpts.committed(saved)
            if missing:  # not yet, or never: only a final check can tell
                return self._failed(saved, missing, failure or self._library_error()) if (
                    final) else ""
            self.writer.write("checkpoint", saved, epoch=saved / self.run.plan.steps_per_epoch,
                              state_sha256=digest)
            self.run.log(saved_line(self.run.ckpts.directory, saved, time.time() - started))
            self.pending.pop(0)
        return ""

    def _library_error(self) -> str:
        log = self.run.library_log
        return log.last_error if log is not None else ""

    def _failed(self, step: int, missing: str, cause: str) -> str:
        latest = self.run.ckpts.latest_complete_step()
        full = "RESOURCE_EXHAUSTED" in cause or "No space left" in cause
        why = (f"no space left on the device ({cause[:200]})" if full
               else (cause[:300] or "orbax gave no reason"))
        log_name = os.path.join(self.run.workdir, "orbax.log")
        return (
            f"the checkpoint of step {step} was not saved: {missing}; cause: {why}. "
            + (f"The latest complete checkpoint is step {latest}; " if latest is not None
               else "There is no complete checkpoint yet; ")
            + ("free some space and " if full else "fix the cause and ")
            + f"rerun the same command to resume. Details in {log_name}")
