"""Remark 4 of Goyal et al. (2017): one global shuffle per epoch, divided among all workers.

Each epoch draws one permutation of all training examples from ``(seed, epoch)``.
Global batch ``i`` is the ``i``-th block of ``global_batch_size`` ids of that
permutation, and process ``p`` of ``P`` reads the ``p``-th contiguous slice of every
global batch. Hence

* the global batches do not depend on the number of processes,
* every example is read at most once per epoch (the remainder, fewer than
    ``global_batch_size`` ids, is dropped and is a different set each epoch),
* a process's share of the data changes every epoch: no worker keeps a fixed subset
    (which is what ``tfds.split_for_jax_process`` and grain's ``ShardByJaxProcess`` do).

This module is pure numpy so that it imports on hosts without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

import lsgd_jax.base.checks as checks

# Distinguishes the permutation stream from the augmentation stream (augment.py),
# so that the same (seed, epoch) never feeds both.
_PERMUTATION_STREAM = 0x5EED_0F_E90C


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if not checks.is_integer(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return checks.integer(name, value, low=minimum)


def check_process_index(process_index: Any, process_count: int) -> int:
    """``process_index`` as an int in ``[0, process_count)``, or a ValueError naming it."""
    process_index = _check_int("process_index", process_index, minimum=0)
    if process_index >= process_count:
        raise ValueError(
            f"process_index={process_index} is out of range for "
            f"process_count={process_count}; valid: 0..{process_count - 1}"
        )
    return process_index


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global batches in one epoch (the remainder is dropped)."""
    num_examples = _check_int("num_examples", num_examples, minimum=1)
    global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
    if global_batch_size > num_examples:
        raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the data set "
                f"(num_examples={num_examples}); one epoch would have no step. Use a "
                f"global batch size <= {num_examples}."
        )
    return num_examples // global_batch_size


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The share of one process; the global batch must split evenly."""
    global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
    process_count = _check_int("process_count", process_count, minimum=1)
    if global_batch_size % process_count:
        raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"process_count={process_count}; every process must read the same "
                f"number of examples. Use a multiple of {process_count}."
        )
    return global_batch_size // process_count


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The single permutation of all example ids for ``epoch`` (Remark 4)."""
    num_examples = _check_int("num_examples", num_examples, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    epoch = _check_int("epoch", epoch, minimum=0)
    rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([seed, epoch, _PERMUTATION_STREAM]))
    )
    dtype = np.int32 if num_examples < 2**31 else np.int64
    return rng.permutation(num_examples).astype(dtype, copy=False)


def shard_indices(
        num_examples: int,
        *,
        global_batch_size: int,
        seed: int,
        epoch: int,
        process_index: int,
        process_count: int,
) -> np.ndarray:
    """Example ids read by one process at each step of one epoch (Remark 4).

    Args:
        num_examples: size of the training set.
        global_batch_size: kn, the minibatch over all workers.
        seed: non-negative integer; with ``epoch`` it fixes the permutation.
        epoch: non-negative epoch number.
        process_index: this process, in ``[0, process_count)``.
        process_count: number of processes sharing every global batch.

    Returns:
        Integer array of shape ``(steps_per_epoch, global_batch_size // process_count)``:
        row ``i`` holds the ids this process reads at step ``i``; the rows of all
        processes, concatenated in process order, form global batch ``i``.
    """
    steps = steps_per_epoch(num_examples, global_batch_size)
    local = local_batch_size(global_batch_size, process_count)
    process_index = check_process_index(process_index, process_count)
    perm = epoch_permutation(num_examples, seed=seed, epoch=epoch)
    batches = perm[: steps * global_batch_size].reshape(steps, global_batch_size)
    start = process_index * local
    return np.ascontiguousarray(batches[:, start : start + local])


def eval_indices(
        num_examples: int,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Padded evaluation ids and mask: every example exactly once over all processes.

    Examples are taken in order; the last global batch is padded. Every process gets
    ``ceil(num_examples / global_batch_size)`` batches, so no process waits at a
    collective while another still has data.

    Returns:
        ``(ids, mask)``, both of shape ``(num_batches, global_batch_size // process_count)``;
        padded slots hold id 0 (a valid id, so decoding never fails) and mask 0.
    """
    num_examples = _check_int("num_examples", num_examples, minimum=1)
    local = local_batch_size(global_batch_size, process_count)
    process_index = check_process_index(process_index, process_count)
    num_batches = -(-num_examples // global_batch_size)
    flat = np.arange(num_batches * global_batch_size, dtype=np.int64)
    mask = flat < num_examples
    flat = np.where(mask, flat, 0)
    start = process_index * local
    ids = flat.reshape(num_batches, global_batch_size)[:, start : start + local]
    mask = mask.reshape(num_batches, global_batch_size)[:, start : start + local]
    return np.ascontiguousarray(ids), np.ascontiguousarray(mask)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a training stream stands: the (epoch, step) of the NEXT batch.

    Saved with the checkpoint (``to_dict`` is JSON-serialisable) and given back to a
    new iterator to resume exactly.
    """

    epoch: int = 0
    step: int = 0

    def __post_init__(self):
        _check_int("Position.epoch", self.epoch, minimum=0)
        _check_int("Position.step", self.step, minimum=0)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "step": int(self.step)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Position":
        if not isinstance(d, Mapping) or set(d) != {"epoch", "step"}:
            raise ValueError(
                    f"a data position must be a mapping with keys 'epoch' and 'step', got {d!r}"
            )
        return cls(epoch=int(d["epoch"]), step=int(d["step"]))

    @classmethod
    def from_global_step(cls, global_step: int, steps_per_epoch: int) -> "Position":
        """The position after ``global_step`` steps taken from the start of epoch 0."""
        global_step = _check_int("global_step", global_step, minimum=0)
        steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        return cls(epoch=global_step // steps_per_epoch, step=global_step % steps_per_epoch)

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.step
