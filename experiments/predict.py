"""Classify image files with an exported model (``--help`` for the flags; the same as ``lsgd-jax predict``).

The command lives in ``lsgd_jax.cli.main``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.cli.main import predict_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict_main())
