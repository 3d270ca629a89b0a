"""Training and evaluation streams of local batches, for one process among many.

``TrainIterator`` reads, at every step, the slice of the global batch that Remark 4's
single global shuffle per epoch gives this process (``sampler.shard_indices``). Its
``position`` (epoch and step of the next batch) is saved with the checkpoint; a new
iterator started at that position continues the uninterrupted stream exactly,
because every batch is a pure function of (seed, epoch, step, process).

``eval_batches`` scores every validation example exactly once over all processes:
the last global batch is padded and masked, and every process yields the same
number of batches so that none waits at a collective.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

import lsgd_jax.base.checks as checks
from lsgd_jax.data.sampler import (
    Position,
    check_process_index,
    eval_indices,
    local_batch_size,
    shard_indices,
    steps_per_epoch,
)
from lsgd_jax.data.source import Source


class TrainIterator:
    """Endless stream of this process's LOCAL training batches (Remark 4).

    Each ``next()`` returns ``{"image": uint8 (b, H, W, C), "label": int32 (b,)}`` with
    ``b = global_batch_size // process_count``. Crossing an epoch boundary draws the
    next epoch's permutation.

    Args:
      source: a ``Source`` (``get_source``) of the training split.
      global_batch_size: kn, the minibatch over all processes.
      seed: non-negative seed of the shuffles and the augmentation.
      process_index, process_count: this process and the number of processes
        (``jax.process_index()``, ``jax.process_count()``).
      position: where to start: a ``Position``, its ``to_dict()`` as saved in a
        checkpoint, or ``None`` for the start of epoch 0.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        position: Position | Mapping[str, Any] | None = None,
    ):
        # Validates every argument now (identically on every process), not at step 1.
        self.local_batch_size = local_batch_size(global_batch_size, process_count)
        self.steps_per_epoch = self._epoch_steps(source.num_examples, global_batch_size)
        process_index = check_process_index(process_index, process_count)
        checks.integer("seed", seed, low=0)
        if position is None:
            position = Position()
        elif not isinstance(position, Position):
            position = Position.from_dict(position)
        if position.step >= self.steps_per_epoch:
            raise ValueError(
                f"position step={position.step} is past the end of an epoch of "
                f"{self.steps_per_epoch} steps (global_batch_size={global_batch_size}, "
                f"num_examples={source.num_examples}); was the checkpoint written "
                "with another global batch size or data set?"
            )
        self.source = source
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self._position = position
        self._epoch_ids: tuple[int, np.ndarray] | None = None

    @staticmethod
    def _epoch_steps(num_examples: int, global_batch_size: int) -> int:
        return steps_per_epoch(num_examples, global_batch_size)

    @property
    def position(self) -> Position:
        """(epoch, step) of the batch that the next ``next()`` returns."""
        return self._position

    def _ids(self, epoch: int) -> np.ndarray:
        if self._epoch_ids is None or self._epoch_ids[0] != epoch:
            ids = shard_indices(
                self.source.num_examples,
                global_batch_size=self.global_batch_size,
                seed=self.seed,
                epoch=epoch,
                process_index=self.process_index,
                process_count=self.process_count,
            )
            self._epoch_ids = (epoch, ids)
        return self._epoch_ids[1]

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, step = self._position.epoch, self._position.step
        ids = self._ids(epoch)[step]
        batch = self.source.get_batch(ids, seed=self.seed, epoch=epoch, train=True)
        self._advance()
        return batch

    def _advance(self) -> None:
        """The position of the next batch: the next step, or the next epoch's first."""
        epoch, step = self._position.epoch, self._position.step + 1
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self._position = Position(epoch=epoch, step=step)

    def close(self) -> None:
        """Nothing to release here (``workers.WorkerTrainIterator`` stops its workers)."""


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Number of (padded) evaluation batches every process yields."""
    return -(-num_examples // global_batch_size)


def eval_batches(
    source: Source,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """LOCAL padded evaluation batches; every example is scored exactly once.

    Yields ``{"image", "label", "mask"}``; ``mask`` is float32, 1 for a real example
    and 0 for padding (whose image and label are those of example 0). Every process
    yields ``num_eval_batches(source.num_examples, global_batch_size)`` batches.
    """
    ids, mask = eval_indices(
        source.num_examples,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return _eval_generator(source, ids, mask)


def _eval_generator(source, ids, mask):
    for batch_ids, batch_mask in zip(ids, mask):
        batch = source.get_batch(batch_ids, seed=0, epoch=0, train=False)
        batch["mask"] = batch_mask.astype(np.float32)
        yield batch
