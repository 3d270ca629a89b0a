"""Momentum SGD in the paper's two forms, momentum correction, and L2 weight decay.

Goyal et al. 2017, section 2.3 ("Subtleties and Pitfalls of Distributed SGD"):

* eq. (9), the buffer without the learning rate (optax.sgd, torch SGD)::

    u_{t+1} = m·u_t + g_t          w_{t+1} = w_t − η_{t+1}·u_{t+1}

* eq. (10), the buffer holding the learning rate (Caffe2, optax.lars)::

    v_{t+1} = m·v_t + η_{t+1}·g_t  w_{t+1} = w_t − v_{t+1}

  The two are equal while η is constant. When η changes, eq. (10) needs the
  momentum correction (eq. 10 with the ratio of rates)::

    v_{t+1} = m·(η_{t+1}/η_t)·v_t + η_{t+1}·g_t

  Without it the old, differently scaled momentum leaks into the new rate
  (Remark 2), which matters most in warmup where η_{t+1} ≫ η_t.

* Weight decay (section 2.1, Remark 1): the loss carries λ/2·‖w‖², so λ·w is
  added to the gradient before momentum. The paper applies none to the
  BatchNorm γ/β; :func:`default_weight_decay_mask` leaves out every scale and
  bias.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

import lsgd_jax.base.checks as checks

MOMENTUM_FORMS = ("eq9", "eq10")  # eqs. (9) and (10) of the paper
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class MomentumState(NamedTuple):
    """State of :func:`momentum_sgd`.

    Attributes:
      count: number of updates applied so far (int32); the schedule's step.
      momentum: the buffer, u of eq. (9) or v of eq. (10), shaped like params.
      last_lr: the rate used by the previous update (float32; 0 before the
        first), which eq. (10)'s momentum correction divides by.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; the name is in checkpoints
    momentum: optax.Updates
    last_lr: jax.Array


def check_momentum(momentum, form: str) -> None:
    """The momentum μ in [0, 1) (or traced) and its form, eq. (9) or (10): the check of
    every optimizer built on :func:`momentum_sgd` (``goyal_sgd``, ``lars``)."""
    if form not in MOMENTUM_FORMS:
        raise ValueError(f"form must be one of {MOMENTUM_FORMS}, got {form!r}")
    checks.real("momentum", momentum, low=0, high=1, open_high=True, traced_ok=True)


def momentum_sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    form: str = "eq9",
    momentum_correction: bool = True,
    correction_threshold: float | None = None,
) -> optax.GradientTransformation:
    """Momentum SGD as eq. (9) or eq. (10) of Goyal et al. 2017.

    form="eq9" (buffer without the learning rate)::

      u ← m·u + g;   Δw = −η·u              (Nesterov: Δw = −η·(g + m·u))

    form="eq10" (buffer holds the learning rate)::

      v ← m·c·v + η·g;   Δw = −v            (Nesterov: Δw = −(η·g + m·v))

    where c = η_t / η_{t−1} with ``momentum_correction=True`` (so the result
    equals eq. (9) at every step, through warmup and decays) and c = 1 without
    it (the failure of Remark 2). The Nesterov forms follow optax.sgd for
    eq. (9) and Caffe2's ``(1+m)·v_new − m·v_old`` for eq. (10); they are
    equal under the correction.

    Args:
      learning_rate: a float, or an ``optax.Schedule`` of the update count.
      momentum: m in [0, 1) (the paper: 0.9).
      nesterov: Nesterov momentum (the paper uses it; standard momentum was
        "equally effective").
      form: "eq9" or "eq10".
      momentum_correction: for form="eq10", rescale v when the rate changes.
        Ignored by form="eq9", whose buffer has no rate in it.
      correction_threshold: None (default) corrects at every change of rate.
        A number r corrects only when max(c, 1/c) > r, as Detectron does with
        SCALE_MOMENTUM_THRESHOLD = 1.1: there the small per-iteration steps of
        gradual warmup go uncorrected and only the decays are corrected.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`MomentumState`.

    Example:
      >>> from lsgd_jax import goyal_schedule
      >>> tx = momentum_sgd(goyal_schedule(batch_size=1024, steps_per_epoch=10),
      ...                   form="eq10", nesterov=True)

    References:
      Goyal et al. 2017, section 2.3, eqs. (9) and (10), Remark 2.
    """
    check_momentum(momentum, form)
    if correction_threshold is not None:
        checks.real("correction_threshold (or None)", correction_threshold, low=1,
                    traced_ok=True)

    def init_fn(params):
        return MomentumState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(jnp.zeros_like, params),
            last_lr=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        m = jnp.asarray(momentum, jnp.float32)

        if form == "eq9":

            def leaf(g, u):
                mu = m.astype(u.dtype)
                u = mu * u + g
                d = g + mu * u if nesterov else u
                return -lr.astype(d.dtype) * d, u

        else:
            if momentum_correction:
                # No previous rate before the first update; v is zero then anyway.
                ratio = jnp.where(state.last_lr > 0, lr / state.last_lr, 1.0)
                if correction_threshold is not None:
                    change = jnp.maximum(ratio, 1.0 / ratio)
                    ratio = jnp.where(change > correction_threshold, ratio, 1.0)
            else:
                ratio = jnp.ones([], jnp.float32)

            def leaf(g, v):
                mc = (m * ratio).astype(v.dtype)
                eta = lr.astype(v.dtype)
                v = mc * v + eta * g
                d = eta * g + m.astype(v.dtype) * v if nesterov else v
                return -d, v

        flat_g, treedef = jax.tree.flatten(updates)
        flat_buf = treedef.flatten_up_to(state.momentum)
        pairs = [leaf(g, b) for g, b in zip(flat_g, flat_buf)]
        return treedef.unflatten([p[0] for p in pairs]), MomentumState(
            count=optax.safe_increment(state.count),
            momentum=treedef.unflatten([p[1] for p in pairs]),
            last_lr=lr,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def default_weight_decay_mask(params: Any) -> Any:
    """Which parameters get L2 weight decay: convolution and dense kernels only.

    A leaf named ``kernel`` (flax Conv and Dense weights) is decayed; a leaf
    named ``scale`` or ``bias`` (BatchNorm γ/β and every bias) is not, as the
    paper applies no weight decay to γ/β (biases: not stated; left out, as
    the reference implementations do). Leaves with other names are decayed
    when they have two or more dimensions (weight matrices, embeddings).

    Args:
      params: a pytree of parameters, e.g. ``variables["params"]`` of a flax model.

    Returns:
      A pytree of bools with the structure of ``params``.
    """

    def leaf_mask(path, leaf):
        name = _key_name(path[-1]) if path else ""
        if name == "kernel":
            return True
        if name in ("scale", "bias"):
            return False
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def goyal_sgd(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    form: str = "eq9",
    momentum_correction: bool = True,
    correction_threshold: float | None = None,
) -> optax.GradientTransformation:
    """The paper's optimizer: L2 weight decay (Remark 1) then Nesterov momentum.

    ::

      g ← g + λ·mask·w        (the gradient of λ/2·‖mask·w‖² in the loss)
      then momentum_sgd(η, m, form, momentum_correction)

    Chains with other Optax transforms (e.g. ``optax.clip_by_global_norm``,
    ``optax.MultiSteps``) and works under ``optax.inject_hyperparams``, which
    then records the current rate in its state. ``inject_hyperparams`` treats
    every callable argument as a schedule: pass a callable
    ``weight_decay_mask`` together with ``static_args="weight_decay_mask"``
    (None, the default mask, needs nothing).

    Args:
      learning_rate: a float, or a schedule such as :func:`goyal_schedule`.
      momentum: m (the paper: 0.9).
      nesterov: Nesterov momentum (the paper: True).
      weight_decay: λ (the paper: 1e-4). 0 disables it.
      weight_decay_mask: pytree of bools or a function params -> pytree of
        bools; None means :func:`default_weight_decay_mask`.
      form: "eq9" or "eq10", see :func:`momentum_sgd`.
      momentum_correction, correction_threshold: see :func:`momentum_sgd`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> from lsgd_jax import goyal_schedule
      >>> schedule = goyal_schedule(batch_size=8192, steps_per_epoch=156)
      >>> tx = goyal_sgd(schedule)

    References:
      Goyal et al. 2017, sections 2.1 (Remark 1), 2.3 and 5.1.
    """
    check_momentum(momentum, form)
    checks.real("weight_decay", weight_decay, low=0, traced_ok=True)
    mask = default_weight_decay_mask if weight_decay_mask is None else weight_decay_mask
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        momentum_sgd(
            learning_rate,
            momentum,
            nesterov=nesterov,
            form=form,
            momentum_correction=momentum_correction,
            correction_threshold=correction_threshold,
        ),
    )
