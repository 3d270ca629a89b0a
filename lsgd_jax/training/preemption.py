"""Preemption and Ctrl-C, agreed on by every process."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax


class PreemptionWatcher:
    """Tells every process, at the same step, that the job is being preempted.

    Several processes: JAX's preemption sync manager (started by
    ``jax.distributed.initialize``) catches SIGTERM on any host and agrees on a
    step at which all of them save. One process: a SIGTERM handler sets a flag.

    Ctrl-C (SIGINT) is a preemption too: the first one saves at the agreed step on
    every process and exits; a second one aborts at once (KeyboardInterrupt).
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.multi = jax.process_count() > 1
        self._flag = threading.Event()
        self._log = log
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            if not self.multi:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag.set()

    def _on_sigint(self, signum, frame):
        del frame
        if self._flag.is_set():
            raise KeyboardInterrupt("second Ctrl-C")
        self._flag.set()
        self._log("Ctrl-C: saving a checkpoint at the next step, then exiting "
                  "(Ctrl-C again aborts at once, losing the work since the last checkpoint)")
        if self.multi:
            # Several processes agree on the step through JAX's preemption notice,
            # which listens for SIGTERM.
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
