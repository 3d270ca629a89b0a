"""Train ResNet-50 on ImageNet with the recipe of Goyal et al. 2017.

    python experiments/imagenet_resnet50.py --workdir runs/rn50_8k --data imagenet \\
        --batch-size 8192 --grad-accum-steps 4

``--help`` lists every flag (defaults: the paper's). The same command on a
workdir with checkpoints resumes. The loop lives in ``lsgd_jax.training.loop``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from lsgd_jax.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
