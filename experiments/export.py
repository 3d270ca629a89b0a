"""Export a training run's weights to one model file (``--help`` for the flags; the same as ``lsgd-jax export``).

The command lives in ``lsgd_jax.commands``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.commands import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
