"""Max-pooling whose gradient is elementwise: no select-and-scatter in the backward.

``jax.grad`` of ``flax.linen.max_pool`` (a ``reduce_window`` max) transposes into an
XLA select-and-scatter on the input padded with −∞: for every window, the first
maximal element in row-major window order receives the window's gradient (XLA's
select is ``a >= b``, so a later element replaces the chosen one only if strictly
greater), and an element chosen by several overlapping windows receives the sum of
their gradients. Padded positions are candidates like any other; one is chosen only
when the window's maximum is −∞ and the pad comes first, and its gradient is dropped.
On a GPU XLA emits it as a zero-fill plus an atomic scatter that fuses with nothing.

:func:`max_pool` computes the same forward (it calls ``nn.max_pool``) and the same
gradient with elementwise operations only. With ``y`` the pooled output, ``g`` its
cotangent and ``(i, j)`` the window offsets in row-major order, each offset's
strided view ``v_ij`` of the (−∞-padded) input gives the mask of windows whose first
maximum sits at that offset::

  m_ij = (v_ij == y) ∧ ¬(m_00 ∨ … ∨ m_previous)

and the input's gradient is ``Σ_ij place_ij(where(m_ij, g, 0))``, where ``place_ij``
is a ``lax.pad`` with interior padding ``stride − 1`` that puts window ``(oh, ow)``'s
value at input position ``(stride·oh + i − pad_top, stride·ow + j − pad_left)``
(negative padding crops what falls in the pad). The sum is accumulated in float32
and cast to the input dtype once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

POOL_IMPLS = ("reduce_window", "masks")  # the ResNet's pool_impl switch


def _check(x: jax.Array, window: Sequence[int], strides: Sequence[int],
           padding: Sequence[Sequence[int]]) -> None:
    if x.ndim != 4 or len(window) != 2 or len(strides) != 2 or len(padding) != 2:
        raise ValueError(f"max_pool expects NHWC input and 2-D window, strides and padding; "
                         f"got shape {x.shape}, window {window}, strides {strides}, "
                         f"padding {padding}")
    for k, s, (lo, hi) in zip(window, strides, padding):
        if k < 1 or s < 1 or lo < 0 or hi < 0 or lo >= k or hi >= k:
            raise ValueError(f"max_pool needs window >= 1, stride >= 1 and 0 <= pad < window; "
                             f"got window {window}, strides {strides}, padding {padding}")


def max_pool(x: jax.Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
             padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))) -> jax.Array:
    """``nn.max_pool(x, window, strides, padding)`` (NHWC) with an elementwise backward.

    Args:
      x: NHWC input.
      window: (kh, kw).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)), each smaller than the window.

    Returns:
      The pooled array, equal to ``nn.max_pool``'s; its gradient equals ``jax.grad``
      of ``nn.max_pool`` (ties included) up to the order of float32 additions.
    """
    window = tuple(int(k) for k in window)
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    _check(x, window, strides, padding)
    return _max_pool(x, window, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _forward(x, window, strides, padding):
    y = nn.max_pool(x, window, strides=strides, padding=padding)
    return y, (x, y)


def _backward(window, strides, padding, residuals, g):
    x, y = residuals
    n, h, w, c = x.shape
    ho, wo = y.shape[1:3]
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    g32 = g.astype(jnp.float32)
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(x.shape, jnp.float32)
    for i in range(kh):
        for j in range(kw):
            view = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                             (1, sh, sw, 1))
            hit = (view == y) & ~taken
            taken = taken | hit
            contribution = jnp.where(hit, g32, 0.0)
            low_h, low_w = i - pt, j - pl
            dx = dx + lax.pad(contribution, jnp.float32(0), (
                (0, 0, 0),
                (low_h, h - low_h - sh * (ho - 1) - 1, sh - 1),
                (low_w, w - low_w - sw * (wo - 1) - 1, sw - 1),
                (0, 0, 0)))
    return (dx.astype(x.dtype),)


_max_pool.defvjp(_forward, _backward)
