"""Evaluate a training run's checkpoint on the validation split (``lsgd-jax evaluate``;
``--help`` for the flags).

The command lives in ``lsgd_jax.cli.main``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.cli.main import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
