"""The run context: what one run holds while it trains, shared by the loop and its records."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lsgd_jax.parallel.agreement import from_process_0
from lsgd_jax.training.checkpoint import Checkpoints
from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.library_logs import LibraryLog
from lsgd_jax.training.plan import Plan
from lsgd_jax.training.workdir import WorkdirLock


@dataclasses.dataclass
class Run:
    """What one run holds while it trains (built by ``loop._prepare``; read by the loop, its
    LogWindow and its Saver)."""

    config: TrainConfig
    workdir: str
    log: Callable[[str], None]
    plan: Plan
    mesh: Any
    train_source: Any
    eval_source: Any
    model: Any
    schedule: Callable
    tx: Any
    state: Any
    ckpts: Checkpoints
    lock: WorkdirLock | None = None
    position: dict | None = None
    finished: dict | None = None  # the result record, when the run had finished
    restart: str = ""  # why this attempt starts over, recorded in metrics.jsonl
    data: dict | None = None  # each split's identity, recorded with every checkpoint
    library_log: LibraryLog | None = None  # orbax's errors, quoted when a save fails
    resuming: str = ""  # the line that says which checkpoint the run resumes from

    def check_lock(self) -> None:
        """Stop every process, writing nothing, when process 0 lost the workdir's lock."""
        error = ""
        if self.lock is not None:
            self.lock.lost_reason()
            error = self.lock.lost
        error = from_process_0(error)
        if error:
            from lsgd_jax.training.workdir import LockLostError

            raise LockLostError(error)
