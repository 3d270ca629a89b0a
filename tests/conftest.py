"""Test-wide JAX set-up: 8 fake CPU devices and strict dtype promotion.

This must run before JAX initialises its backends, so it sits at the top of
the conftest that pytest imports first.
"""

import os

from lsgd_jax.parallel.distributed import (
    use_cpu_devices,  # imports jax; its backends start on first use
)

use_cpu_devices(8)
# Keep TensorFlow (data tests) from grabbing every core and from printing banners.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# ---------------------------------------------------------------- the session's trained run
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """The workdir of one small finished run (helpers.TRAINED), shared by the tests that
    read a run back, export it, predict with it or start from it; tests that change it
    work on a copy (helpers.copy_workdir)."""
    from helpers import TRAINED

    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(TrainConfig(**TRAINED), workdir, log=lambda msg: None)
    return workdir


@pytest.fixture(scope="session")
def model_path(run_dir, tmp_path_factory):
    """``run_dir``'s model, exported by ``lsgd-jax export``."""
    from lsgd_jax.cli.main import export_main

    out = str(tmp_path_factory.mktemp("model") / "model.msgpack")
    assert export_main(["--workdir", run_dir, "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_tfds(tmp_path_factory):
    """The tiny tfds ImageNet of tiny_imagenet.py, built once per session (tests that damage
    it work on a copy: tiny_imagenet.damaged_copy)."""
    pytest.importorskip("tensorflow_datasets")
    from tiny_imagenet import build

    return build(tmp_path_factory.mktemp("tfds"))
