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
