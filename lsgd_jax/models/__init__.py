"""Models of Goyal et al. 2017: ResNets with per-worker (per-group) BatchNorm."""

from lsgd_jax.models.batch_norm import GroupBatchNorm
from lsgd_jax.models.resnet import (
    DTYPES,
    MODEL_NAMES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet8,
    ResNet18,
    ResNet20,
    ResNet34,
    ResNet50,
    ResNet101,
    get_model,
)

__all__ = [
    "DTYPES",
    "MODEL_NAMES",
    "BasicBlock",
    "Bottleneck",
    "GroupBatchNorm",
    "ResNet",
    "ResNet8",
    "ResNet18",
    "ResNet20",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "get_model",
]
