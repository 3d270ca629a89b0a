"""Training-mode per-group BatchNorm arranged for XLA's GPU reductions.

The same math as :class:`~lsgd_jax.models.batch_norm.GroupBatchNorm`'s plain path
(float32 statistics per group of ``n`` examples, one pass for E[x] and E[x²]); only
the shape of the reductions and, optionally, the backward differ.

Split reductions (``impl="split"``). A group's statistics reduce ``rows = n·H·W``
positions per channel. XLA splits a long column reduction in two stages by itself,
at about the square root of the row count, which leaves each GPU thread only a few
rows at ResNet-50's shapes. Here the activations of each group are viewed as
``(S, R, C)`` with ``R`` the largest divisor of ``rows`` not above ``split_rows``
(thousands), summed over ``R`` in float32, then over ``S``::

  s₁[g, s, c] = Σ_r x[g, s, r, c]        s₂[g, s, c] = Σ_r x[g, s, r, c]²
  μ_g = Σ_s s₁ / rows                    σ²_g = max(Σ_s s₂ / rows − μ_g², 0)

An ``optimization_barrier`` on the partial sums keeps XLA from merging the two
stages back into one reduction.

Hand-written backward (``impl="custom_vjp"``). With x̂ = (x − μ_g)·r_g,
r_g = (σ²_g + ε)^(−1/2), y = γ·x̂ + β and N = rows, the gradient of any loss of
(y, μ, σ²) is::

  ∂β = Σ_g Σ dy                     ∂γ = Σ_g Σ dy·x̂
  ∂x = γ·r_g·(dy − Σdy/N − x̂·Σ(dy·x̂)/N) + ∂μ_g/N + ∂σ²_g·2(x − μ_g)/N

The two per-group sums come from one split reduction over (dy, dy·x̂); ∂x is then
one elementwise multiply-add per element, ``∂x = a·dy + b·x + c`` with per-(group,
channel) a, b, c. Saved for the backward: the input x (in its own dtype), μ and r.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BN_IMPLS = ("plain", "split", "custom_vjp")  # GroupBatchNorm's impl switch
DEFAULT_SPLIT_ROWS = 4096


def split_rows(rows: int, limit: int) -> int:
    """The largest divisor of ``rows`` that is at most ``limit`` (the inner stage R)."""
    if rows < 1 or limit < 1:
        raise ValueError(f"split_rows needs rows >= 1 and limit >= 1, got {rows}, {limit}")
    return max(d for d in range(1, min(rows, limit) + 1) if rows % d == 0)


def _grouped(x: jax.Array, num_groups: int, limit: int) -> jax.Array:
    """x (b, H, W, C) viewed as (groups, S, R, C) in float32."""
    rows = x.size // (num_groups * x.shape[-1])
    r = split_rows(rows, limit)
    return x.reshape(num_groups, rows // r, r, x.shape[-1]).astype(jnp.float32)


def _group_sums(*terms: jax.Array) -> tuple[jax.Array, ...]:
    """Σ over (S, R) of each (groups, S, R, C) term, R first: (groups, C) each."""
    partial = lax.optimization_barrier(tuple(jnp.sum(t, axis=2) for t in terms))
    return tuple(jnp.sum(p, axis=1) for p in partial)


def _moments(xs: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = xs.shape[1] * xs.shape[2]
    s1, s2 = _group_sums(xs, jnp.square(xs))
    mean = s1 / rows
    var = jnp.maximum(s2 / rows - jnp.square(mean), 0.0)
    return mean, var


def _normalize(xs, scale, bias, mean, var, epsilon):
    mul = scale[None, :] * lax.rsqrt(var + epsilon)
    add = bias[None, :] - mean * mul
    return xs * mul[:, None, None, :] + add[:, None, None, :]


def group_bn_split(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
                   epsilon: float, dtype: Any, limit: int = DEFAULT_SPLIT_ROWS):
    """Per-group BN of NHWC ``x`` with split reductions; autodiff backward.

    Returns:
      (y in ``dtype`` with x's shape, μ (groups, C), σ² (groups, C)), statistics float32.
    """
    xs = _grouped(x, num_groups, limit)
    mean, var = _moments(xs)
    y = _normalize(xs, scale, bias, mean, var, epsilon)
    return y.reshape(x.shape).astype(dtype), mean, var


def group_bn_custom_vjp(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
                        epsilon: float, dtype: Any, limit: int = DEFAULT_SPLIT_ROWS):
    """As :func:`group_bn_split`, with the hand-written backward of the module docstring."""
    return _bn_vjp(x, scale, bias, num_groups, float(epsilon), jnp.dtype(dtype), int(limit))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _bn_vjp(x, scale, bias, num_groups, epsilon, dtype, limit):
    return group_bn_split(x, scale, bias, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                          limit=limit)


def _bn_vjp_forward(x, scale, bias, num_groups, epsilon, dtype, limit):
    xs = _grouped(x, num_groups, limit)
    mean, var = _moments(xs)
    y = _normalize(xs, scale, bias, mean, var, epsilon)
    rstd = lax.rsqrt(var + epsilon)
    return (y.reshape(x.shape).astype(dtype), mean, var), (x, scale, mean, rstd)


def _bn_vjp_backward(num_groups, epsilon, dtype, limit, residuals, cotangents):
    del epsilon, dtype
    x, scale, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    xs = _grouped(x, num_groups, limit)
    dys = _grouped(dy, num_groups, limit)
    rows = xs.shape[1] * xs.shape[2]
    m, r = mean[:, None, None, :], rstd[:, None, None, :]
    sum_dy, sum_dy_xhat = _group_sums(dys, dys * ((xs - m) * r))
    # ∂x = k·dy + x̂·(2∂σ²/(r·N) − k·Σdy·x̂/N) + (∂μ − k·Σdy)/N with k = γ·r, folded
    # into a·dy + b·x + c (x̂ = r·x − r·μ).
    k = scale[None, :] * rstd
    coef_xhat = 2.0 * dvar / (rstd * rows) - k * sum_dy_xhat / rows
    a = k
    b = coef_xhat * rstd
    c = (dmean - k * sum_dy) / rows - coef_xhat * rstd * mean
    dx = dys * a[:, None, None, :] + xs * b[:, None, None, :] + c[:, None, None, :]
    return (dx.reshape(x.shape).astype(x.dtype), jnp.sum(sum_dy_xhat, axis=0),
            jnp.sum(sum_dy, axis=0))


_bn_vjp.defvjp(_bn_vjp_forward, _bn_vjp_backward)
