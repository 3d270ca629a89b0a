"""ResNets as in Goyal et al. 2017: fb.resnet.torch's ResNet-50 and relatives.

What the paper fixes (sections 3 and 5.1):

* stride 2 on the 3×3 convolution of a bottleneck (fb.resnet.torch, often
  called "ResNet v1.5"), projection shortcuts where the shape changes;
* He-normal convolutions as fb.resnet.torch draws them, N(0, 2 / (k·k·c_out)),
  no convolution bias; the final fully-connected layer ~ N(0, 0.01), bias 0;
* zero-γ: γ = 0 on the last BN of every residual block, so each block starts
  as the identity (``zero_init_residual``; the ablation turns it off);
* BatchNorm statistics per worker of n images (:class:`GroupBatchNorm`).

Layout is NHWC. Parameters are float32; ``dtype`` is the compute dtype
(bfloat16 or float32) of convolutions and activations, while BN statistics,
the pooled features, the classifier and the logits are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lsgd_jax.base.checks as checks
from lsgd_jax.models.batch_norm import GroupBatchNorm
from lsgd_jax.models.grouped_bn import BN_IMPLS, DEFAULT_SPLIT_ROWS
from lsgd_jax.models.pooling import POOL_IMPLS, max_pool
from lsgd_jax.models.stem import STEM_IMPLS, StemConv

# fb.resnet.torch: weight ~ N(0, sqrt(2 / (kW·kH·nOutputPlane))), i.e. He/fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Goyal et al. 2017, section 5.1: the fully-connected layer ~ N(0, 0.01).
fc_init = nn.initializers.normal(stddev=0.01)


def _conv(features: int, size: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    # Symmetric padding k//2, as torch's nn.SpatialConvolution in fb.resnet.torch
    # (flax's "SAME" pads (0, 1) at stride 2 on even sizes).
    pad = size // 2
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    features: int
    stride: int = 1
    bn: Any = GroupBatchNorm
    dtype: Any = jnp.float32
    zero_init_residual: bool = True

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        last_gamma = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(self.bn(name="bn1")(y, train))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = self.bn(name="bn2", scale_init=last_gamma)(y, train)
        return nn.relu(y + _shortcut(x, self.features, self.stride, self, train))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here, fb.resnet.torch) → 1×1 with 4× expansion."""

    features: int
    stride: int = 1
    bn: Any = GroupBatchNorm
    dtype: Any = jnp.float32
    zero_init_residual: bool = True

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        last_gamma = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        out = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(self.bn(name="bn1")(y, train))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(self.bn(name="bn2")(y, train))
        y = _conv(out, 1, 1, self.dtype, "conv3")(y)
        y = self.bn(name="bn3", scale_init=last_gamma)(y, train)
        return nn.relu(y + _shortcut(x, out, self.stride, self, train))


def _shortcut(x: jax.Array, out: int, stride: int, block: nn.Module, train: bool) -> jax.Array:
    """Identity, or a 1×1 projection + BN (γ = 1) where the shape changes."""
    if x.shape[-1] == out and stride == 1:
        return x
    # Defined inside the parent's compact scope, so names stay under the block.
    p = nn.Conv(
        out,
        (1, 1),
        strides=(stride, stride),
        use_bias=False,
        dtype=block.dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        parent=block,
        name="proj_conv",
    )(x)
    return block.bn(parent=block, name="proj_bn")(p, train)


class ResNet(nn.Module):
    """ResNet with per-group BatchNorm; ``__call__(x, train)`` returns float32 logits.

    Attributes:
      stage_sizes: residual blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      num_classes: outputs of the classifier.
      num_filters: width of the first stage (doubled at every later stage).
      stem: "imagenet" (7×7/2 conv, 3×3/2 max-pool) or "cifar" (3×3/1 conv,
        no pooling; for 28–32 pixel inputs).
      dtype: compute dtype of convolutions and activations.
      bn_group_size: the paper's n, examples per BN group in training, or None
        for one group per call (the whole batch the module sees).
      bn_momentum: running-average momentum (the paper: 0.9).
      bn_epsilon: BN epsilon.
      zero_init_residual: γ = 0 on the last BN of every residual block.
      bn_impl, bn_split_rows: how training-mode BN statistics are reduced
        (:class:`GroupBatchNorm`'s ``impl`` and ``split_rows``; the same math).
      pool_impl: "reduce_window" (``nn.max_pool``) or "masks" (the same pool with an
        elementwise backward, :func:`lsgd_jax.models.pooling.max_pool`).
      stem_impl: "conv" (``nn.Conv``), "pad4" or "s2d" (the same convolution
        rearranged, :class:`lsgd_jax.models.stem.StemConv`).
      The last four change speed on a GPU, not results (equal within float
      rounding) nor the parameter and state trees.
    """

    stage_sizes: Sequence[int]
    block: Any = Bottleneck
    num_classes: int = 1000
    num_filters: int = 64
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    bn_group_size: int | None = 32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True
    bn_impl: str = "plain"
    bn_split_rows: int = DEFAULT_SPLIT_ROWS
    pool_impl: str = "reduce_window"
    stem_impl: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        check_levers(self.bn_impl, self.bn_split_rows, self.pool_impl, self.stem_impl)
        if self.stem_impl == "s2d" and self.stem != "imagenet":
            raise ValueError("stem_impl='s2d' needs the imagenet stem (7x7 stride 2), "
                             f"got stem={self.stem!r}")
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images, got shape {x.shape}")
        bn = functools.partial(
            GroupBatchNorm,
            group_size=self.bn_group_size,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            impl=self.bn_impl,
            split_rows=self.bn_split_rows,
        )
        x = x.astype(self.dtype)
        size, stride = (7, 2) if self.stem == "imagenet" else (3, 1)
        if self.stem_impl == "conv":
            x = _conv(self.num_filters, size, stride, self.dtype, "stem_conv")(x)
        else:
            x = StemConv(self.num_filters, size, stride, self.stem_impl, self.dtype,
                         kernel_init=conv_init, name="stem_conv")(x)
        x = nn.relu(bn(name="stem_bn")(x, train))
        if self.stem == "imagenet":
            pool = nn.max_pool if self.pool_impl == "reduce_window" else max_pool
            x = pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block(
                    features=self.num_filters * 2**i,
                    stride=2 if i > 0 and j == 0 else 1,
                    bn=bn,
                    dtype=self.dtype,
                    zero_init_residual=self.zero_init_residual,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x, train)

        # Global average pool and classifier in float32: cheap, and the loss
        # (softmax cross-entropy) wants float32 logits.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=fc_init,
            bias_init=nn.initializers.zeros,
            name="fc",
        )(x)


def check_levers(bn_impl: str, bn_split_rows: int, pool_impl: str, stem_impl: str) -> None:
    """Raise ValueError naming the value if a speed switch of :class:`ResNet` is not valid."""
    for name, value, valid in (("bn_impl", bn_impl, BN_IMPLS), ("pool_impl", pool_impl, POOL_IMPLS),
                               ("stem_impl", stem_impl, STEM_IMPLS)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    checks.integer("bn_split_rows", bn_split_rows)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
# CIFAR-style ResNet-20 (He et al. 2016, section 4.2): 3 stages of 16/32/64
# filters, 3 basic blocks each, for 28–32 pixel inputs (Fashion-MNIST, CIFAR).
ResNet20 = functools.partial(
    ResNet, stage_sizes=(3, 3, 3), block=BasicBlock, num_filters=16, stem="cifar"
)

# ResNet-8: one basic block per stage of ResNet-20 (16/32/64 filters): the
# smallest ResNet with every mechanism of the paper (per-group BN, zero-γ on
# each block's last BN, projection shortcuts, He init), for CPU-sized studies.
ResNet8 = functools.partial(
    ResNet, stage_sizes=(1, 1, 1), block=BasicBlock, num_filters=16, stem="cifar"
)

_PRESETS = {
    "resnet8": ResNet8,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = tuple(_PRESETS)  # the names get_model accepts
# The presets with the CIFAR stem (3x3 stride 1, no pool), where stem_impl s2d cannot apply.
CIFAR_STEM_MODELS = tuple(n for n, f in _PRESETS.items() if f.keywords.get("stem") == "cifar")
DTYPES = tuple(_DTYPES)        # the compute dtypes get_model accepts by name


def get_model(
    name: str,
    *,
    num_classes: int,
    dtype: Any = jnp.float32,
    bn_group_size: int | None = 32,
    zero_init_residual: bool = True,
    **kwargs: Any,
) -> ResNet:
    """Build a preset ResNet by name.

    Args:
      name: one of "resnet8", "resnet18", "resnet20", "resnet34", "resnet50", "resnet101"
        (case-insensitive).
      num_classes: classifier outputs (1000 for ImageNet, 10 for Fashion-MNIST).
      dtype: compute dtype, jnp.float32 / jnp.bfloat16 or "float32" / "bfloat16".
      bn_group_size: the paper's n, examples per BN group, or None.
      zero_init_residual: zero-γ on the last BN of each residual block.
      **kwargs: further :class:`ResNet` attributes (e.g. bn_momentum, or the speed
        switches bn_impl, bn_split_rows, pool_impl, stem_impl).

    Returns:
      A :class:`ResNet` module.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(_PRESETS)}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    checks.integer("num_classes", num_classes)
    if bn_group_size is not None:
        checks.integer("bn_group_size (or None)", bn_group_size)
    check_levers(kwargs.get("bn_impl", "plain"), kwargs.get("bn_split_rows", DEFAULT_SPLIT_ROWS),
                 kwargs.get("pool_impl", "reduce_window"), kwargs.get("stem_impl", "conv"))
    return _PRESETS[key](
        num_classes=num_classes,
        dtype=dtype,
        bn_group_size=bn_group_size,
        zero_init_residual=zero_init_residual,
        **kwargs,
    )
