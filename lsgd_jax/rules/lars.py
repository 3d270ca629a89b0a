"""Layer-wise adaptive rate scaling (LARS, You et al. 2017) with the paper's other rules kept.

Per parameter tensor w with gradient g (one leaf of the tree), weight decay λ and
trust coefficient η_tc (You et al.: 0.001)::

  trust = η_tc·‖w‖ / (‖g‖ + λ‖w‖ + ε)
  g ← trust · (g + λ·w)

then the momentum of Goyal et al. 2017, eq. (9) or eq. (10) with the momentum
correction (:func:`lsgd_jax.rules.optim.momentum_sgd`), at the global rate η_t of a
schedule (:func:`lsgd_jax.goyal_schedule` or :func:`lsgd_jax.poly_schedule`).

Leaves outside the mask (:func:`lsgd_jax.default_weight_decay_mask`: every BatchNorm
γ/β and every bias) get neither the decay nor the trust ratio: g is left as it is,
so they move at the plain global rate η_t, as in the paper's SGD. A leaf with
‖w‖ = 0 or a zero denominator also keeps trust = 1 (as ``optax.lars`` does), so a
zero-initialised tensor is not frozen.

Where this differs from ``optax.lars`` (optax 0.2): there, by default, the decay and
the trust ratio apply to every leaf (BN and biases included); the trust ratio's
denominator is ‖g + λw‖ (You et al. write ‖g‖ + λ‖w‖, which this module keeps);
the momentum is eq. (10) without the correction. With the same masks, the same ε,
eq. (10) without the correction, and either λ = 0 or g parallel to w, the two are
the same update (tested).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import lsgd_jax.base.checks as checks
from lsgd_jax.rules.optim import (
    ScalarOrSchedule,
    check_momentum,
    default_weight_decay_mask,
    momentum_sgd,
)


def _check_non_negative(name: str, value, *, positive: bool = False) -> None:
    checks.real(name, value, low=0, open_low=positive, traced_ok=True)


def scale_by_lars(
    *,
    weight_decay: float = 1e-4,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """The LARS direction: ``g ← η_tc·‖w‖ / (‖g‖ + λ‖w‖ + ε) · (g + λw)`` on masked leaves.

    Stateless; needs ``params`` in ``update``. Leaves where the mask is False are
    passed through unchanged (no decay, trust ratio 1). Norms are per leaf, in float32.

    Args:
      weight_decay: λ, in both the direction and the trust ratio's denominator.
      trust_coefficient: η_tc (You et al. 2017: 0.001).
      eps: ε added to the denominator.
      mask: pytree of bools or a function params -> pytree of bools; None means
        :func:`lsgd_jax.default_weight_decay_mask` (kernels only).

    Returns:
      An ``optax.GradientTransformation``.
    """
    _check_non_negative("weight_decay", weight_decay)
    _check_non_negative("trust_coefficient", trust_coefficient, positive=True)
    _check_non_negative("eps", eps)
    mask = default_weight_decay_mask if mask is None else mask

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_lars needs the parameters: call update(g, state, params)")
        flags = mask(params) if callable(mask) else mask

        def leaf(g, w, on):
            if not on:
                return g
            lam = jnp.asarray(weight_decay, jnp.float32)
            w_norm = jnp.linalg.norm(w.astype(jnp.float32))
            g_norm = jnp.linalg.norm(g.astype(jnp.float32))
            denominator = g_norm + lam * w_norm + jnp.asarray(eps, jnp.float32)
            trust = jnp.where((w_norm > 0) & (denominator > 0),
                              trust_coefficient * w_norm / jnp.where(denominator > 0,
                                                                      denominator, 1.0), 1.0)
            return (trust * (g.astype(jnp.float32) + lam * w.astype(jnp.float32))).astype(g.dtype)

        flat_g, treedef = jax.tree.flatten(updates)
        flat_w = treedef.flatten_up_to(params)
        flat_on = treedef.flatten_up_to(flags)
        return treedef.unflatten([leaf(g, w, bool(on))
                                  for g, w, on in zip(flat_g, flat_w, flat_on)]), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lars(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    form: str = "eq9",
    momentum_correction: bool = True,
    correction_threshold: float | None = None,
) -> optax.GradientTransformation:
    """LARS with the paper's momentum and mask: :func:`scale_by_lars` then ``momentum_sgd``.

    ::

      g ← η_tc·‖w‖ / (‖g‖ + λ‖w‖ + ε) · (g + λw)    (kernels; BN γ/β and biases: g as is)
      then momentum_sgd(η_t, m, form, momentum_correction)   (eq. 9, or eq. 10 corrected)

    The arguments other than the trust ratio's are :func:`lsgd_jax.goyal_sgd`'s, with
    its defaults (Nesterov, λ = 1e-4, eq. 9), so swapping one for the other changes
    only the trust ratio. The global rate is typically far above SGD's: a kernel moves
    by about η_t·η_tc·‖w‖ per step whatever its gradient's size.

    Args:
      learning_rate: a float, or a schedule (:func:`lsgd_jax.goyal_schedule`,
        :func:`lsgd_jax.poly_schedule`).
      momentum, nesterov, form, momentum_correction, correction_threshold: see
        :func:`lsgd_jax.rules.optim.momentum_sgd`.
      weight_decay: λ, applied on the masked leaves only (0 disables it).
      trust_coefficient: η_tc (You et al. 2017: 0.001).
      eps: ε of the trust ratio's denominator.
      weight_decay_mask: the leaves that get the decay and the trust ratio; None means
        :func:`lsgd_jax.default_weight_decay_mask`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> from lsgd_jax import poly_schedule
      >>> schedule = poly_schedule(batch_size=32768, steps_per_epoch=39, epochs=72,
      ...                          base_lr=0.4, warmup_epochs=25)
      >>> tx = lars(schedule)

    References:
      You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional Networks",
      eqs. for the local learning rate; Goyal et al. 2017, eqs. (9), (10), Remark 1.
    """
    check_momentum(momentum, form)
    return optax.chain(
        scale_by_lars(weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                      mask=weight_decay_mask),
        momentum_sgd(learning_rate, momentum, nesterov=nesterov, form=form,
                     momentum_correction=momentum_correction,
                     correction_threshold=correction_threshold),
    )
