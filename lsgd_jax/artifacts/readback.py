"""A training run read back: its configuration, model and verified state, for evaluation
and export.

``restore_run(workdir)`` rebuilds what training built (the model from the checkpoint's
own configuration, the optimizer that fixes the state's tree) and reads the newest
checkpoint that verifies, or a given step, with
:func:`read_verified`: the same SHA-256 check as a resume, but
nothing is written, moved or locked, so a workdir in use by a run can be read while
it trains. Every process calls it with the same arguments.

The model's facts that are not in the configuration (classes, channels) come from
the checkpoint's array shapes (``params/fc/kernel``: features × classes,
``params/stem_conv/kernel``: k × k × channels × filters), so no data set is opened.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

import lsgd_jax.base.checks as checks
from lsgd_jax.parallel.agreement import everywhere, exchange
from lsgd_jax.training.checkpoint import (
    CorruptCheckpointError,
    first_line,
    quiet_item_metadata,
    read_checkpoint,
    read_json_item,
    step_dirs,
)
from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.recipe import build_optimizer

# The side of a preprocessed image when --image-size is not given (the sources' defaults).
DEFAULT_IMAGE_SIZE = {"imagenet": 224, "folder": 224, "synthetic": 224, "fashion_mnist": 28}
# ImageNet's eval transform: shorter side to 256, centre crop 224 (section 5.1); the
# other data sets are stored at their size and evaluated as they are.
IMAGENET_EVAL_RESIZE = 256


class UnreadableCheckpointError(ValueError):
    """No checkpoint can be read (for readers that change nothing on disk)."""


def read_verified(directory: str, target: Any, *, step: int | None = None,
                  log: Any = print) -> tuple[Any, dict, int]:
    """Read a checkpoint onto ``target`` and verify its SHA-256, changing nothing on disk.

    For readers of a workdir (evaluation, export) that may be in use by a run: no
    orbax manager is opened (it would remove a save in progress) and nothing is
    moved aside. With ``step``, that checkpoint or an error; without, the newest
    one that verifies, older ones tried in turn (each skipped one is logged). A
    checkpoint removed by the run's retention while being read is skipped silently.

    Returns:
      (state, meta, step).

    Raises:
      UnreadableCheckpointError: ``step`` is missing or damaged, or no checkpoint verifies.
    """
    directory = os.path.abspath(directory)
    steps = [step] if step is not None else step_dirs(directory)
    if step is not None and not os.path.isdir(os.path.join(directory, str(step))):
        raise UnreadableCheckpointError(
            f"{os.path.join(directory, str(step))} does not exist; the complete checkpoints "
            f"are steps {sorted(step_dirs(directory)) or 'none'}")
    skipped = []
    for candidate in steps:
        step_dir = os.path.join(directory, str(candidate))
        problem = None
        try:
            state, _, meta = read_checkpoint(directory, candidate, target)
        except CorruptCheckpointError as e:
            problem = e
        except Exception as e:  # not proven damage, but this reader cannot use it either
            problem = CorruptCheckpointError(candidate, step_dir, first_line(e))
        if not everywhere(problem is None, "readback"):  # every process takes the same one
            problem = problem or CorruptCheckpointError(
                candidate, step_dir, "another process could not read it")
        if problem is None:
            return state, meta, candidate
        if not everywhere(os.path.isdir(step_dir), "readback_exists") and step is None:
            continue  # removed meanwhile by the run's retention: not damage
        if step is not None:
            raise UnreadableCheckpointError(f"{problem}; nothing was changed") from None
        skipped.append(candidate)
        log(f"warning: {problem}; trying the previous checkpoint (nothing was changed)")
    if skipped:
        raise UnreadableCheckpointError(
            f"no checkpoint in {directory} verifies (damaged: steps {skipped}); nothing was "
            "changed")
    raise UnreadableCheckpointError(
        f"{directory} holds no checkpoint: give the --workdir of a training run that has "
        "saved one (a checkpoint is saved at the end of every epoch)")


@dataclasses.dataclass
class RunFacts:
    """What inference needs to know about a run's model and its inputs."""

    model: str
    num_classes: int
    image_size: int
    channels: int
    eval_resize: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    dtype: str
    data: str
    tfds_name: str


@dataclasses.dataclass
class RestoredRun:
    """A run's checkpoint, verified: ``state`` is a :class:`lsgd_jax.engine.step.TrainState`
    replicated over ``mesh``."""

    workdir: str
    config: TrainConfig
    facts: RunFacts
    model: Any
    state: Any
    step: int
    meta: dict
    mesh: Any
    steps_per_epoch: int | None


def pixel_stats(data: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std (0-255 units) that data set ``data``'s source gives."""
    from lsgd_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD

    if data == "fashion_mnist":
        from lsgd_jax.data.fashion_mnist import PIXEL_MEAN, PIXEL_STD

        return PIXEL_MEAN, PIXEL_STD
    if data == "synthetic" and channels != 3:
        from lsgd_jax.data.synthetic import SyntheticSource

        source = SyntheticSource(split="validation", num_examples=1, channels=channels,
                                 image_size=1)
        return tuple(source.pixel_mean), tuple(source.pixel_std)
    return IMAGENET_MEAN, IMAGENET_STD


def _checkpoint_shapes(directory: str, step: int | None) -> dict | None:
    """``{"classes": C, "channels": c}`` from the newest checkpoint whose metadata reads."""
    with quiet_item_metadata():
        return _shapes(ocp, directory, step)


def _shapes(ocp, directory: str, only: int | None) -> dict | None:
    for step in [only] if only is not None else step_dirs(directory):
        checkpointer = ocp.StandardCheckpointer()
        try:
            metadata = checkpointer.metadata(os.path.join(directory, str(step), "state"))
            tree = getattr(metadata, "item_metadata", metadata)
            params = tree["params"]
            return {"classes": int(params["fc"]["kernel"].shape[-1]),
                    "channels": int(params["stem_conv"]["kernel"].shape[-2])}
        except Exception:  # damaged or partly removed: read_verified reports it
            continue
        finally:
            checkpointer.close()
    return None


def run_facts(config: TrainConfig, *, num_classes: int, channels: int) -> RunFacts:
    size = config.image_size or DEFAULT_IMAGE_SIZE[config.data]
    mean, std = pixel_stats(config.data, channels)
    return RunFacts(model=config.model, num_classes=num_classes, image_size=size,
                    channels=channels,
                    eval_resize=(IMAGENET_EVAL_RESIZE if config.data in ("imagenet", "folder")
                                 else size),
                    pixel_mean=tuple(mean), pixel_std=tuple(std), dtype=config.dtype,
                    data=config.data, tfds_name=config.tfds_name)


def _steps_per_epoch(workdir: str) -> int | None:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f)["plan"]["steps_per_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore_run(workdir: str, *, step: int | None = None, mesh: Any = None,
                log: Callable[[str], None] = print) -> RestoredRun:
    """Read ``workdir``'s newest verified checkpoint (or ``step``) without changing anything.

    Raises:
      UnreadableCheckpointError (a ValueError): no workdir, no checkpoint, ``step``
        missing or damaged, or none that verifies; the message names the path.
    """
    from lsgd_jax.engine.step import create_train_state
    from lsgd_jax.models import get_model
    from lsgd_jax.parallel.distributed import make_mesh, replicated_sharding

    workdir = os.path.abspath(workdir)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(workdir):
        raise UnreadableCheckpointError(
            f"--workdir {workdir} does not exist; give the --workdir of a training run")
    if step is not None:
        checks.integer("--step", step, low=0, error=UnreadableCheckpointError)
    shapes = _checkpoint_shapes(directory, step)
    # The configuration of the newest checkpoint whose meta reads (read_verified
    # re-reads the chosen checkpoint's own meta below).
    config = _checkpoint_config(directory, step)
    if shapes is None or config is None:  # nothing readable: read_verified names the problem
        read_verified(directory, None, step=step, log=lambda msg: None)
        raise UnreadableCheckpointError(f"no checkpoint in {directory} can be read; nothing "
                                        "was changed")
    facts = run_facts(config, num_classes=shapes["classes"], channels=shapes["channels"])
    mesh = make_mesh() if mesh is None else mesh
    model = get_model(config.model, num_classes=facts.num_classes, dtype=config.dtype,
                      bn_group_size=None, zero_init_residual=config.zero_init_residual,
                      **config.levers())
    # The run's own optimizer (--optimizer) fixes the state's tree; the rate does not.
    tx = build_optimizer(config, 0.0)
    shape = (1, facts.image_size, facts.image_size, facts.channels)
    abstract = jax.eval_shape(lambda: create_train_state(
        model, tx, rng=jax.random.key(0), input_shape=shape, mesh=mesh))
    sharding = replicated_sharding(mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
    state, meta, step = read_verified(directory, target, step=step, log=log)
    saved = TrainConfig.from_dict(meta.get("config", config.to_dict()))
    if saved != config:  # an older checkpoint of a run resumed with other options
        config = saved
        facts = run_facts(config, num_classes=facts.num_classes, channels=facts.channels)
    return RestoredRun(workdir=workdir, config=config, facts=facts, model=model, state=state,
                       step=step, meta=meta, mesh=mesh,
                       steps_per_epoch=_steps_per_epoch(workdir))


def _checkpoint_config(directory: str, step: int | None) -> TrainConfig | None:

    for candidate in [step] if step is not None else step_dirs(directory):
        try:
            meta = read_json_item(directory, candidate, "meta")
            return TrainConfig.from_dict(meta["config"])
        except Exception:
            continue
    return None


def evaluate_run(run: RestoredRun, *, eval_batch_size: int | None = None,
                 data_dir: str | None = None) -> dict:
    """Top-1/top-5 error and loss of ``run.state`` over the whole validation split, with the
    training loop's exact masked evaluation."""
    from lsgd_jax.data import decode_workers_of, open_source
    from lsgd_jax.engine.step import make_eval_step
    from lsgd_jax.training.loop import evaluate

    config = run.config if data_dir is None else run.config.replace(data_dir=data_dir)
    devices, processes = run.mesh.devices.size, jax.process_count()
    batch = eval_batch_size or config.eval_batch_size or config.batch_size
    if batch < 1 or batch % devices or batch % processes:
        raise ValueError(f"--eval-batch-size {batch} must be a positive multiple of the "
                         f"{devices} devices and the {processes} processes; use a multiple "
                         f"of {devices}")
    source = open_source(config, "validation", workdir=run.workdir,
                         process_index=jax.process_index(), process_count=processes,
                         exchange=exchange)
    try:
        if source.num_classes > run.facts.num_classes:
            raise ValueError(f"the validation split of {config.data} has {source.num_classes} "
                             f"classes but the model of {run.workdir} has "
                             f"{run.facts.num_classes}")
        eval_step = make_eval_step(run.model, run.mesh, pixel_mean=source.pixel_mean,
                                   pixel_std=source.pixel_std)
        result = evaluate(eval_step, run.state, source, global_batch_size=batch, mesh=run.mesh,
                          decode_workers=decode_workers_of(config))
    finally:
        source.close()
    return {**result, "eval_batch_size": batch}
