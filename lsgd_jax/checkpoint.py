"""Checkpoints of a training run: orbax, asynchronous and atomic, with the data position.

``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state``: the :class:`lsgd_jax.step.TrainState` (parameters, BN averages,
  optimizer state, step);
* ``data``: the input pipeline's position (epoch and step of the next batch)
  and the seed that, with it, fixes every later batch and augmentation;
* ``meta``: the run's configuration and ``state_sha256``.

Orbax writes a checkpoint under a temporary name and renames it when complete,
so a process killed mid-save leaves no half checkpoint under a step name; the
temporary directories are removed when the next run opens the directory.
Retention keeps the latest ``keep`` checkpoints and every one whose step is a
multiple of ``keep_period``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lsgd_jax.config import RESUME_FIELDS


class CheckpointMismatchError(ValueError):
    """A checkpoint that the current configuration cannot resume from."""


def state_sha256(state: Any) -> str:
    """SHA-256 of the bytes of every array of ``state``, in tree order.

    For the reproducibility audit in ``metrics.jsonl``: two runs that agree on
    this agree bit for bit. Replicated global arrays are read from this
    process's first copy, so every process computes the same digest.
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        array = np.asarray(jax.device_get(leaf))
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def check_resumable(directory: str, config: dict) -> int | None:
    """Refuse early a checkpoint directory written by an incompatible configuration.

    Reads only the small ``meta`` item of the latest complete checkpoint (no
    arrays), so a run can fail before opening data sets or compiling.

    Returns:
      The latest complete step, or None when there is nothing to resume.

    Raises:
      CheckpointMismatchError: naming each differing field and both values.
    """
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=("state", "data", "meta"),
    )
    try:
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    _compare(os.path.join(os.path.abspath(directory), str(step)), dict(meta).get("config", {}),
             config)
    return step


def _compare(where: str, saved: dict, config: dict) -> None:
    diffs = [
        f"{name}: checkpoint has {saved.get(name)!r}, this run has {config.get(name)!r}"
        for name in RESUME_FIELDS
        if name in saved and saved.get(name) != config.get(name)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written by another configuration ("
            + "; ".join(diffs) + "). Use the checkpoint's values, or a new --workdir to "
            "start a fresh run; nothing was changed on disk."
        )


class Checkpoints:
    """The run's checkpoint directory.

    Args:
      directory: ``WORKDIR/checkpoints``.
      keep: how many of the latest checkpoints to keep.
      keep_period: also keep every checkpoint whose step is a multiple of this
        (0 or None: none).
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_period:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        """Step of the latest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, position: dict, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the devices."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(position),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def read_meta(self, step: int) -> tuple[dict, dict]:
        """The ``data`` and ``meta`` items of checkpoint ``step``."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        )
        return dict(restored["data"]), dict(restored["meta"])

    def read_state(self, step: int) -> Any:
        """The ``state`` item of checkpoint ``step`` (nested dicts of arrays), for inspection.

        Shapes and dtypes come from the checkpoint's own metadata and every array
        lands on this process's first device, so a checkpoint written on any
        number of devices or processes can be read here.
        """
        path = os.path.join(self.directory, str(step), "state")
        checkpointer = ocp.StandardCheckpointer()
        try:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            return checkpointer.restore(path, abstract)
        finally:
            checkpointer.close()

    def restore(self, step: int, target: Any, *, config: dict) -> tuple[Any, dict, dict]:
        """Restore checkpoint ``step`` onto the shapes and shardings of ``target``.

        Checks first that the checkpoint was written by a compatible
        configuration (same model, data, batch size, ...), so a mismatch is
        reported by name instead of as an array-shape error deep in orbax.

        Returns:
          (state, data position, meta).

        Raises:
          CheckpointMismatchError: naming each differing field, both values,
            and the checkpoint directory.
        """
        position, meta = self.read_meta(step)
        _compare(os.path.join(self.directory, str(step)), meta.get("config", {}), config)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match this run's train state "
                f"(model {config.get('model')!r}): {e}"
            ) from e
        return restored["state"], position, meta

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
