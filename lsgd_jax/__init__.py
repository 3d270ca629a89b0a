"""lsgd-jax: accurate, large minibatch synchronous SGD (Goyal et al. 2017) in JAX.

The public names below are importable from ``lsgd_jax``; each is loaded from its layer
on first use (PEP 562), so ``import lsgd_jax.data`` (the host-side input, which the
decoding workers import) loads no jax, and nothing here imports TensorFlow.

The layers, lowest first; a module imports only from its own layer's package and
lower ones (``tests/test_layers.py`` keeps it so):

    base | _version                        argument checks (never a bool), this host's processes; the version
    data                                   host-side input: sampler, sources, transforms, workers
    rules | models | collectives | parallel   the paper's rules; ResNets; §4's all-reduces;
                                           processes, mesh, feed, agreement
    engine                                 batch layout, the train and eval steps
    training                               config, plan, recipe, the loop, checkpoints, records
    artifacts                              read-back, export, predict, curves
    cli                                    lsgd-jax train | evaluate | export | predict | curves
    bench | study                          benchmark helpers; the small-scale study
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lsgd_jax._version import __version__ as __version__  # re-exported

# name -> the module that defines it
_PUBLIC = {
    # the paper's rules
    "goyal_schedule": "lsgd_jax.rules.schedules",
    "poly_schedule": "lsgd_jax.rules.schedules",
    "scaled_learning_rate": "lsgd_jax.rules.schedules",
    "MomentumState": "lsgd_jax.rules.optim",
    "default_weight_decay_mask": "lsgd_jax.rules.optim",
    "goyal_sgd": "lsgd_jax.rules.optim",
    "momentum_sgd": "lsgd_jax.rules.optim",
    "lars": "lsgd_jax.rules.lars",
    "scale_by_lars": "lsgd_jax.rules.lars",
    # §4's all-reduces
    "ALLREDUCE_NAMES": "lsgd_jax.collectives",
    "get_allreduce": "lsgd_jax.collectives",
    # models, processes and devices, the step
    "ResNet": "lsgd_jax.models",
    "get_model": "lsgd_jax.models",
    "InFlight": "lsgd_jax.parallel.distributed",
    "data_sharding": "lsgd_jax.parallel.distributed",
    "host_to_global": "lsgd_jax.parallel.distributed",
    "initialize_distributed": "lsgd_jax.parallel.distributed",
    "make_mesh": "lsgd_jax.parallel.distributed",
    "replicated_sharding": "lsgd_jax.parallel.distributed",
    "BatchLayout": "lsgd_jax.engine.layout",
    "validate_batch_layout": "lsgd_jax.engine.layout",
    "TrainState": "lsgd_jax.engine.step",
    "TrainStep": "lsgd_jax.engine.step",
    "create_train_state": "lsgd_jax.engine.step",
    "make_eval_step": "lsgd_jax.engine.step",
    "make_train_step": "lsgd_jax.engine.step",
    # the run
    "TrainConfig": "lsgd_jax.training.config",
    "Plan": "lsgd_jax.training.plan",
    "make_plan": "lsgd_jax.training.plan",
    "state_sha256": "lsgd_jax.training.checkpoint",
    "train_and_evaluate": "lsgd_jax.training.loop",
    # after training
    "ModelFileError": "lsgd_jax.training.model_file",
    "load_model": "lsgd_jax.training.model_file",
    "load_images": "lsgd_jax.artifacts.predict",
    "normalize": "lsgd_jax.artifacts.predict",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lsgd_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from lsgd_jax.artifacts.predict import load_images, normalize  # noqa: F401
    from lsgd_jax.collectives import ALLREDUCE_NAMES, get_allreduce  # noqa: F401
    from lsgd_jax.engine.layout import BatchLayout, validate_batch_layout  # noqa: F401
    from lsgd_jax.engine.step import (  # noqa: F401
        TrainState,
        TrainStep,
        create_train_state,
        make_eval_step,
        make_train_step,
    )
    from lsgd_jax.models import ResNet, get_model  # noqa: F401
    from lsgd_jax.parallel.distributed import (  # noqa: F401
        InFlight,
        data_sharding,
        host_to_global,
        initialize_distributed,
        make_mesh,
        replicated_sharding,
    )
    from lsgd_jax.rules.lars import lars, scale_by_lars  # noqa: F401
    from lsgd_jax.rules.optim import (  # noqa: F401
        MomentumState,
        default_weight_decay_mask,
        goyal_sgd,
        momentum_sgd,
    )
    from lsgd_jax.rules.schedules import goyal_schedule, poly_schedule, scaled_learning_rate  # noqa: F401
    from lsgd_jax.training.checkpoint import state_sha256  # noqa: F401
    from lsgd_jax.training.config import TrainConfig  # noqa: F401
    from lsgd_jax.training.loop import train_and_evaluate  # noqa: F401
    from lsgd_jax.training.model_file import ModelFileError, load_model  # noqa: F401
    from lsgd_jax.training.plan import Plan, make_plan  # noqa: F401
