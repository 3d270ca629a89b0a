"""lsgd-jax: accurate, large minibatch synchronous SGD (Goyal et al. 2017) in JAX.

Public names are re-exported here once; import them from ``lsgd_jax``.
The input pipeline lives in ``lsgd_jax.data`` (it needs the ``data`` extra:
TensorFlow and tfds), so importing this package never imports TensorFlow.
"""

# --- optimization rules (schedules.py, optim.py, lars.py) ---
from lsgd_jax.schedules import goyal_schedule, poly_schedule, scaled_learning_rate
from lsgd_jax.optim import (
    MomentumState,
    default_weight_decay_mask,
    goyal_sgd,
    momentum_sgd,
)
from lsgd_jax.lars import lars, scale_by_lars

# --- collectives (collectives/, costmodel.py) ---
from lsgd_jax.collectives import ALLREDUCE_NAMES, get_allreduce

# --- engine (models/, parallel.py, layout.py, step.py) ---
from lsgd_jax.models import ResNet, get_model
from lsgd_jax.parallel import (
    InFlight,
    data_sharding,
    host_to_global,
    initialize_distributed,
    make_mesh,
    replicated_sharding,
)
from lsgd_jax.layout import BatchLayout, validate_batch_layout
from lsgd_jax.step import (
    TrainState,
    TrainStep,
    create_train_state,
    make_eval_step,
    make_train_step,
)

# --- training loop (config.py, plan.py, train.py, checkpoint.py) ---
from lsgd_jax.config import TrainConfig
from lsgd_jax.plan import Plan, make_plan
from lsgd_jax.checkpoint import state_sha256
from lsgd_jax.train import train_and_evaluate

# --- after training (model_file.py, predict.py) ---
from lsgd_jax.model_file import ModelFileError, load_model
from lsgd_jax.predict import load_images, normalize

from lsgd_jax._version import __version__

__all__ = [
    "ALLREDUCE_NAMES",
    "get_allreduce",
    "MomentumState",
    "default_weight_decay_mask",
    "goyal_schedule",
    "goyal_sgd",
    "lars",
    "momentum_sgd",
    "poly_schedule",
    "scale_by_lars",
    "scaled_learning_rate",
    # engine
    "BatchLayout",
    "InFlight",
    "ResNet",
    "TrainState",
    "TrainStep",
    "create_train_state",
    "data_sharding",
    "get_model",
    "host_to_global",
    "initialize_distributed",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "replicated_sharding",
    "validate_batch_layout",
    # training loop
    "Plan",
    "TrainConfig",
    "make_plan",
    "state_sha256",
    "train_and_evaluate",
    # after training
    "ModelFileError",
    "load_images",
    "load_model",
    "normalize",
]
