"""BatchNorm with statistics per group of examples: the paper's per-worker BN.

Goyal et al. 2017, section 3 ("BatchNorm"): the statistics are computed over
each worker's n images (n = 32 in the paper) and never across workers; n is a
hyper-parameter of BN, independent of the number of workers k. A device that
holds b = g·n images therefore computes g independent sets of statistics,
exactly as g workers of n images would.

Running averages (momentum 0.9, the paper's value): averaging them over all
workers is this project's choice, not the paper's (which only says "running
average"; a Caffe2 worker kept its own). One copy, identical everywhere, makes
checkpoints and evaluation independent of the worker they are read from. The
update is linear, so averaging after every step equals keeping one average per
worker and averaging at the end; this module therefore keeps a single copy::

  mean ← m·mean + (1 − m)·avg_groups(μ_g)
  var  ← m·var  + (1 − m)·avg_groups(σ²_g)

where μ_g, σ²_g are the statistics of group g (σ² biased, as flax's
BatchNorm stores it) and m = 0.9 ("momentum" in the flax convention: the weight
of the old value; torch's momentum=0.1 is the same rule).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import lsgd_jax.base.checks as checks
from lsgd_jax.models.grouped_bn import (
    BN_IMPLS,
    DEFAULT_SPLIT_ROWS,
    group_bn_custom_vjp,
    group_bn_split,
)


class GroupBatchNorm(nn.Module):
    """BatchNorm over groups of ``group_size`` consecutive examples, NHWC.

    In training mode the batch axis (axis 0) is split into consecutive groups
    of ``group_size`` examples and each group is normalized with its own mean
    and variance over (batch, spatial) positions; ``None`` uses the whole batch
    the module sees as one group. Statistics are computed in float32 in one
    pass (mean and mean of squares) whatever the input dtype; the output has
    ``dtype``. In evaluation mode the running averages are used.

    Attributes:
      group_size: examples per BN group (the paper's n), or None.
      momentum: weight of the old running average (the paper: 0.9).
      epsilon: added to the variance (fb.resnet.torch / cuDNN: 1e-5).
      dtype: output dtype (the compute dtype).
      scale_init: initializer of γ (zeros for the paper's zero-γ).
      impl: how training-mode statistics are computed, all with the same math
        (:mod:`lsgd_jax.models.grouped_bn`): "plain" (one reduction per group),
        "split" (two-stage reductions of about ``split_rows`` rows), "custom_vjp"
        (split, with a hand-written one-pass backward). Evaluation is the same in all.
      split_rows: the most rows of the inner stage of "split" and "custom_vjp".
    """

    group_size: int | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    impl: str = "plain"
    split_rows: int = DEFAULT_SPLIT_ROWS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.impl not in BN_IMPLS:
            raise ValueError(f"GroupBatchNorm: impl must be one of {BN_IMPLS}, got {self.impl!r}")
        checks.integer("GroupBatchNorm: split_rows", self.split_rows)
        features = x.shape[-1]
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)

        if not train:
            mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
            add = bias - ra_mean.value * mul
            bshape = (1,) * (x.ndim - 1) + (features,)
            y = x.astype(jnp.float32) * mul.reshape(bshape) + add.reshape(bshape)
            return y.astype(self.dtype)

        batch = x.shape[0]
        group = batch if self.group_size is None else self.group_size
        if group <= 0 or batch % group:
            raise ValueError(
                f"GroupBatchNorm: the batch of {batch} examples seen by this layer "
                f"is not a multiple of bn group_size={group}; use a group size "
                f"that divides the per-device (micro)batch"
            )
        num_groups = batch // group
        if self.impl != "plain":
            y, mean, var = self._levered(x, scale, bias, num_groups)
            self._update_averages(ra_mean, ra_var, mean, var)
            return y
        xg = x.reshape((num_groups, group) + x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, xg.ndim - 1))
        # One fused pass over the activations: E[x] and E[x^2] in float32.
        mean = jnp.mean(xg, axis=axes)
        mean_sq = jnp.mean(jnp.square(xg), axis=axes)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)

        self._update_averages(ra_mean, ra_var, mean, var)

        # y = γ·(x − μ)/σ + β folded into one multiply-add per element.
        mul = scale[None, :] * jax.lax.rsqrt(var + self.epsilon)
        add = bias[None, :] - mean * mul
        gshape = (num_groups,) + (1,) * (xg.ndim - 2) + (features,)
        y = xg * mul.reshape(gshape) + add.reshape(gshape)
        return y.reshape(x.shape).astype(self.dtype)

    def _update_averages(self, ra_mean, ra_var, mean, var) -> None:
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jnp.mean(mean, axis=0)
            ra_var.value = m * ra_var.value + (1.0 - m) * jnp.mean(var, axis=0)

    def _levered(self, x, scale, bias, num_groups):
        fn = group_bn_split if self.impl == "split" else group_bn_custom_vjp
        return fn(x, scale, bias, num_groups=num_groups, epsilon=self.epsilon,
                  dtype=self.dtype, limit=self.split_rows)
