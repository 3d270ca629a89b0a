"""The paper's five claims on the whole of Fashion-MNIST: the study's command line.

    nohup nice -n 19 python experiments/small_scale.py --commit > runs/small_scale.log 2>&1 &
    python experiments/small_scale.py --help

The study itself is ``lsgd_jax.study`` (its ``cli`` module documents the modes).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lsgd_jax.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
