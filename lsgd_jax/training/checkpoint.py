"""Checkpoints of a training run: orbax, asynchronous and atomic, with the data position.

``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state``: the :class:`lsgd_jax.engine.step.TrainState` (parameters, BN averages,
  optimizer state, step);
* ``data``: the input pipeline's position (epoch and step of the next batch)
  and the seed that, with it, fixes every later batch and augmentation;
* ``meta``: the run's configuration and ``state_sha256``.

Orbax writes a checkpoint under a temporary name and renames it when complete,
so a process killed mid-save leaves no half checkpoint under a step name; the
temporary directories are removed when the next run opens the directory.
Retention keeps the latest ``keep`` checkpoints and every one whose step is a
multiple of ``keep_period``. Every restore is verified against the saved
``state_sha256`` (:meth:`Checkpoints.restore_latest`).

Only proven damage moves a checkpoint aside, to ``corrupt-<step>``: a SHA-256
that differs, an unparsable ``data`` or ``meta``, a missing or truncated file.
Any other error while reading (an I/O error of a network file system, a
permission, out of memory, anything unknown) says nothing about the checkpoint:
it is retried, and if it persists the run stops with :class:`CheckpointReadError`
and nothing is moved. A save is recorded only once its step is complete on disk
(:meth:`Checkpoints.committed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from lsgd_jax.parallel.agreement import worst
from lsgd_jax.training.config import resume_fields


class CheckpointMismatchError(ValueError):
    """A checkpoint that the current configuration cannot resume from."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message is one line."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint failed for a reason that is not proven damage, every retry."""

    def __init__(self, step: int, path: str, error: BaseException, attempts: int):
        self.step, self.path, self.error = step, path, error
        super().__init__(
            f"could not read checkpoint step {step} ({path}) in {attempts} attempts: "
            f"{first_line(error)}. It is not known to be damaged, so nothing was moved or "
            "written; fix the cause (the file system, its permissions, the memory) and rerun "
            "the same command")


class CheckpointSaveError(CheckpointError):
    """A save did not produce a complete checkpoint."""


class NoUsableCheckpointError(CheckpointError):
    """The workdir holds a run's progress, but none of its checkpoints can be resumed."""
class CorruptCheckpointError(Exception):
    """A checkpoint that cannot be read back as it was saved."""

    def __init__(self, step: int, path: str | None, reason: str):
        self.step, self.path, self.reason = step, path, reason
        where = f" ({path})" if path else ""
        super().__init__(f"checkpoint step {step} is damaged{where}: {reason}")


# A read error that is not proven damage is retried this many times, after
# RESTORE_BACKOFF_S seconds, then twice that, ... (0.5 + 1 + 2 s in all).
RESTORE_RETRIES = 3
RESTORE_BACKOFF_S = 0.5

# Files every complete checkpoint of this project has (orbax's OCDBT layout).
_REQUIRED_FILES = ("data/metadata", "meta/metadata", "state/_METADATA", "state/manifest.ocdbt")

_PATH = re.compile(r"(/[^\s'\",:)]+)")


def _damaged_file(error: BaseException, step_dir: str) -> str | None:
    """The first path under ``step_dir`` that an orbax/tensorstore error message names."""
    for match in _PATH.finditer(str(error)):
        if match.group(1).startswith(step_dir):
            return match.group(1)
    return None


# Messages of tensorstore (under orbax) that prove the bytes on disk are wrong or
# missing: a file shorter than its index says, a broken compressed stream, a file
# not found. Anything else (UNKNOWN, UNAVAILABLE, PERMISSION_DENIED,
# RESOURCE_EXHAUSTED, ...) says nothing about the checkpoint.
_DAMAGE_MARKS = ("OUT_OF_RANGE:", "DATA_LOSS:", "NOT_FOUND:", "Truncated", "corrupt", "Corrupt")


def proven_damage(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) proves a checkpoint damaged."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (CorruptCheckpointError, json.JSONDecodeError, FileNotFoundError)):
            return True
        if not isinstance(error, (OSError, MemoryError)) and any(
                mark in str(error) for mark in _DAMAGE_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


def first_line(error: BaseException, limit: int = 240) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text[:limit]}"


def state_sha256(state: Any, *, require_finite: bool = False) -> str:
    """SHA-256 of the bytes of every array of ``state``, in tree order.

    For the reproducibility audit in ``metrics.jsonl`` and the check of every
    restore: two states that agree on this agree bit for bit. Replicated global
    arrays are read from this process's first copy, so every process computes
    the same digest.

    Args:
      require_finite: raise ``FloatingPointError`` naming the first array with a
        NaN or Inf (checked in the same pass over the state).
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        array = np.asarray(jax.device_get(leaf))
        if require_finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise FloatingPointError(
                f"the train state holds non-finite values in {jax.tree_util.keystr(path)}")
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def step_dirs(directory: str) -> list[int]:
    """Steps of the complete checkpoints (orbax renames a finished save to its step)."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def read_json_item(directory: str, step: int, item: str) -> dict:
    """The JSON item ``item`` of checkpoint ``step``, read directly (no orbax manager)."""
    path = os.path.join(directory, str(step), item, "metadata")
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise CorruptCheckpointError(step, path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(step, path, "not a JSON object")
    return value


def check_resumable(directory: str, config: dict) -> int | None:
    """Refuse early a checkpoint directory written by an incompatible configuration.

    Reads only the small ``meta`` item of the newest checkpoint whose ``meta`` can
    be read (no arrays, no orbax manager: nothing is written or logged), so a run
    can fail before opening data sets or compiling. Damaged checkpoints are
    skipped here and dealt with by :meth:`Checkpoints.restore_latest`.

    Returns:
      The step whose configuration was compared, or None when there is none.

    Raises:
      CheckpointMismatchError: naming each differing field and both values.
    """
    directory = os.path.abspath(directory)
    for step in step_dirs(directory):
        try:
            meta = read_json_item(directory, step, "meta")
        except (OSError, CorruptCheckpointError):
            continue
        _compare(os.path.join(directory, str(step)), meta.get("config", {}), config)
        return step
    return None


def check_data(directory: str, data: dict, data_dir: str | None = None) -> None:
    """Refuse to resume a checkpoint trained on other data than ``data`` (each split's
    identity, ``Source.identity``). Checkpoints from before identities were recorded
    are not checked. A moved copy of the same data has the same identity.

    Raises:
      CheckpointMismatchError: naming the split, the saved and the new count and
        fingerprint.
    """
    directory = os.path.abspath(directory)
    for step in step_dirs(directory):
        try:
            saved = read_json_item(directory, step, "meta").get("data") or {}
        except (OSError, CorruptCheckpointError):
            continue
        for split, new in data.items():
            old = saved.get(split)
            if old is None or (old["examples"], old["fingerprint"]) == (
                    new["examples"], new["fingerprint"]):
                continue
            where = f" (--data-dir {data_dir})" if data_dir else ""
            raise CheckpointMismatchError(
                f"cannot resume from {os.path.join(directory, str(step))}: it was trained on "
                f"other data. Its {split} split had {old['examples']:,} examples, fingerprint "
                f"{old['fingerprint']}; this run's{where} has {new['examples']:,}, "
                f"fingerprint {new['fingerprint']} ({new['what']}). A moved copy of the same "
                "data resumes; for other data, give a new --workdir. Nothing was changed on "
                "disk.")
        return


def _compare(where: str, saved: dict, config: dict) -> None:
    diffs = [
        f"{name}: checkpoint has {saved.get(name)!r}, this run has {config.get(name)!r}"
        for name in resume_fields(saved)
        if name in saved and saved.get(name) != config.get(name)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written by another configuration ("
            + "; ".join(diffs) + "). Use the checkpoint's values, or a new --workdir to "
            "start a fresh run; nothing was changed on disk."
        )


def read_checkpoint(directory: str, step: int, target: Any, *, config: dict | None = None,
                    restore: Callable[[Any], Any] | None = None) -> tuple[Any, dict, dict]:
    """Read checkpoint ``step`` of ``directory`` onto ``target`` and verify it.

    The one verification of a checkpoint, for the trainer's resume
    (:meth:`Checkpoints.restore_latest`) and for the readers of a finished run
    (``lsgd_jax.artifacts.readback``): every file of a complete checkpoint is there, its
    ``data`` and ``meta`` items parse, its configuration is ``config``'s (when given), and
    the restored state's SHA-256 is the one saved with it.

    Args:
      restore: reads the state given its abstract tree (shapes, dtypes, shardings);
        default: an orbax checkpointer on the ``state`` item, with no manager (it would
        remove a save in progress).

    Returns:
      (state, data position, meta).

    Raises:
      CorruptCheckpointError: proven damage (:func:`proven_damage`), naming the file.
      CheckpointMismatchError: the checkpoint is of another configuration.
      Exception: any other error of orbax or the file system, as raised (it says
        nothing about the checkpoint).
    """
    step_dir = os.path.join(directory, str(step))
    try:
        for name in _REQUIRED_FILES:  # name the file when a known one is missing
            try:
                os.stat(os.path.join(step_dir, name))
            except FileNotFoundError:
                raise CorruptCheckpointError(step, os.path.join(step_dir, name),
                                             "the file is missing") from None
        position = read_json_item(directory, step, "data")
        meta = read_json_item(directory, step, "meta")
        if config is not None:
            _compare(step_dir, meta.get("config", {}), config)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        state = (restore or _reader(step_dir))(abstract)
        digest = state_sha256(state)
    except (CheckpointMismatchError, CorruptCheckpointError):
        raise
    except Exception as e:
        if not proven_damage(e):
            raise
        path = _damaged_file(e, step_dir)
        if path is None and isinstance(e, FileNotFoundError) and e.filename:
            path = str(e.filename)
        raise CorruptCheckpointError(step, path or step_dir, first_line(e)) from e
    if "state_sha256" in meta and digest != meta["state_sha256"]:
        raise CorruptCheckpointError(
            step, os.path.join(step_dir, "state"),
            f"the restored state's SHA-256 {digest[:12]}… differs from the "
            f"{meta['state_sha256'][:12]}… saved with it")
    return state, position, meta


def _reader(step_dir: str) -> Callable[[Any], Any]:
    """Restore a checkpoint's ``state`` item alone, with no orbax manager."""
    def read(abstract: Any) -> Any:
        checkpointer = ocp.StandardCheckpointer()
        try:
            with quiet_item_metadata():
                return checkpointer.restore(os.path.join(step_dir, "state"), abstract)
        finally:
            checkpointer.close()
    return read


@contextlib.contextmanager
def quiet_item_metadata() -> Iterator[None]:
    """Silence orbax's warning that a checkpoint's item has no metadata file of its own
    (true of every item read alone, as readers without a manager do)."""
    def keep(record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()

    absl = logging.getLogger("absl")
    absl.addFilter(keep)
    try:
        yield
    finally:
        absl.removeFilter(keep)


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
        self.quarantined: list[str] = []  # corrupt-<step> folders made by this object

    def latest_step(self) -> int | None:
        """Step of the latest complete checkpoint, or None."""
        return self._manager.latest_step()

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

    def quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` aside to ``corrupt-<step>`` (never deleted); returns the path."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"corrupt-{step}")
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(self.directory, f"corrupt-{step}-{suffix}")
        if jax.process_index() == 0 and os.path.exists(source):
            os.rename(source, target)
        _sync(f"lsgd_jax quarantine {step}")
        self._manager.reload()
        return target

    def restore_latest(self, target: Any, *, config: dict, log: Any = print,
                       retries: int | None = None, backoff_s: float | None = None
                       ) -> tuple[Any, dict, dict, int] | None:
        """Restore the newest intact checkpoint onto ``target``, verified by its SHA-256.

        Each candidate, newest first, is read and its state hashed on every process;
        the hash must equal the ``state_sha256`` saved with it. A checkpoint proven
        damaged (:func:`proven_damage`: a missing or truncated file, unparsable
        ``data`` or ``meta``, an empty folder, a hash that differs) is moved aside
        to ``corrupt-<step>`` with a message naming the step and the file, and the
        next older one is tried. Any other error is retried ``retries`` times,
        waiting ``backoff_s``, then twice that, and so on; the processes agree on
        every outcome. The moved steps are in :attr:`quarantined`.

        Returns:
          (state, data position, meta, step), or None when no checkpoint is intact.

        Raises:
          CheckpointMismatchError: an intact checkpoint of another configuration.
          CheckpointReadError: an error that is not damage persisted; nothing was moved.
        """
        retries = RESTORE_RETRIES if retries is None else retries
        backoff_s = RESTORE_BACKOFF_S if backoff_s is None else backoff_s
        for step in step_dirs(self.directory):
            step_dir = os.path.join(self.directory, str(step))
            for attempt in range(retries + 1):
                outcome, value = self._try_restore(step, target, config)
                # Every process takes the worst outcome: retry > damaged > ok.
                agreed = worst(outcome, "checkpoint_read")
                if agreed == _OK:
                    return value
                if agreed == _DAMAGED:
                    problem = value if outcome == _DAMAGED else CorruptCheckpointError(
                        step, step_dir, "another process found it damaged")
                    moved = self.quarantine(step)
                    self.quarantined.append(moved)
                    log(f"warning: {problem}. Moved it to {moved} (nothing deleted); trying "
                        "the previous checkpoint.")
                    break
                error = value if outcome == _FAILED else RuntimeError(
                    "another process could not read it")
                if attempt == retries:
                    raise CheckpointReadError(step, step_dir, error, retries + 1)
                delay = backoff_s * 2 ** attempt
                log(f"warning: reading checkpoint step {step} failed ({first_line(error)}); "
                    f"retrying in {delay:g} s")
                time.sleep(delay)
        return None

    def _try_restore(self, step: int, target: Any, config: dict) -> tuple[int, Any]:
        """One attempt at ``step``: (_OK, result), (_DAMAGED, CorruptCheckpointError) or
        (_FAILED, the error)."""
        def restore(abstract: Any) -> Any:
            return self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

        try:
            state, position, meta = read_checkpoint(self.directory, step, target,
                                                    config=config, restore=restore)
        except CheckpointMismatchError:
            raise
        except CorruptCheckpointError as e:
            return _DAMAGED, e
        except Exception as e:  # orbax and tensorstore raise many kinds
            return _FAILED, e
        return _OK, (state, position, meta, step)

    def latest_complete_step(self) -> int | None:
        """The newest step that :meth:`committed` finds complete, or None."""
        return next((s for s in step_dirs(self.directory) if not self.committed(s)), None)

    def committed(self, step: int) -> str:
        """"" when checkpoint ``step`` is complete on disk, else what is missing.

        Looks at the files alone: orbax renames a save to its step once it is
        complete, and no orbax call is made, so any one process may ask."""
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.isdir(step_dir):
            leftovers = [n for n in os.listdir(self.directory)
                         if n.startswith(f"{step}.") and "tmp" in n]
            return ("only an unfinished " + leftovers[0] + " is on disk") if leftovers else (
                "it is not on disk")
        for name in _REQUIRED_FILES:
            if not os.path.exists(os.path.join(step_dir, name)):
                return f"{os.path.join(step_dir, name)} is missing"
        return ""

    def saving(self) -> bool:
        """True while an asynchronous save is still being written."""
        return bool(self._manager.is_saving_in_progress())

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in progress, then close. A save that failed is reported by
        :meth:`committed` (the trainer checks every save before it closes), so orbax's
        own error here goes to its log, not over the trainer's."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001
            logging.getLogger("orbax").error("a save failed", exc_info=True)
        self._manager.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_OK, _DAMAGED, _FAILED = 0, 1, 2  # outcomes of one restore attempt, in order of precedence


def list_corrupt(directory: str) -> list[str]:
    """The ``corrupt-*`` folders of a checkpoint directory, oldest step first."""
    if not os.path.isdir(directory):
        return []
    return sorted((n for n in os.listdir(directory) if n.startswith("corrupt-")),
                  key=lambda n: [int(p) if p.isdigit() else 0 for p in n.split("-")[1:]])
