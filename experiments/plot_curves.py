"""Plot training and validation curves of one or more runs into a PNG: ``lsgd-jax curves``.

    python experiments/plot_curves.py runs/kn256 runs/kn8k --reference runs/kn256
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.cli.main import curves_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(curves_main(prog="plot_curves.py"))
