"""Learning-rate rules of Goyal et al. 2017 (sections 2.1, 2.2 and 5.1).

* Linear scaling rule (section 2.1): when the minibatch is multiplied by k,
  multiply the learning rate by k. With the reference rate η = 0.1 for a
  minibatch of 256, the rate for minibatch kn is η · kn / 256.
* Gradual warmup (section 2.2): start at η and add a constant amount every
  iteration so that the rate reaches kη after 5 epochs; constant warmup holds
  η for those epochs instead.
* Step decay (section 5.1): 90 epochs, rate × 0.1 at epochs 30, 60 and 80.
* Polynomial decay (not the paper's; the large-batch recipes after it, e.g. with
  LARS): after the same warmup, from kη down to an end rate as (1 − progress)^power.

Durations are given in epochs and converted with ``steps_per_epoch``, so one
configuration holds at every minibatch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import optax

import lsgd_jax.base.checks as checks

WARMUP_KINDS = ("gradual", "constant", "none")
SCHEDULE_KINDS = ("steps", "poly")  # goyal_schedule, poly_schedule


def _check_positive(name: str, value, *, integer: bool = False) -> None:
    if integer and not (checks.is_real(value) and math.isfinite(value) and value > 0
                        and float(value).is_integer()):  # 256.0 is kn = 256
        raise ValueError(f"{name} must be {checks.describe_integer()}, got {value!r}")
    checks.real(name, value, low=0, open_low=True)


def scaled_learning_rate(
    base_lr: float, batch_size: int, reference_batch_size: int = 256
) -> float:
    """The linear scaling rule (section 2.1): ``base_lr * batch_size / reference_batch_size``.

    Args:
      base_lr: the rate η for ``reference_batch_size`` (the paper: 0.1 for 256).
      batch_size: the total minibatch kn over all workers.
      reference_batch_size: the minibatch that ``base_lr`` was tuned for.

    Returns:
      kη, the learning rate for minibatch ``batch_size``.

    Example:
      >>> scaled_learning_rate(0.1, 8192)
      3.2
    """
    _check_positive("base_lr", base_lr)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("reference_batch_size", reference_batch_size, integer=True)
    return base_lr * batch_size / reference_batch_size


def warmup_steps(
    *,
    batch_size: int,
    steps_per_epoch: int,
    reference_batch_size: int = 256,
    warmup_epochs: float = 5,
    warmup: str = "gradual",
) -> int:
    """Iterations that :func:`goyal_schedule` spends in warmup: ``ceil(W)``, W = epochs · steps.

    The schedule is in warmup at every step t < W, so a fractional W (2.5
    steps) warms up over ceil(W) = 3 steps. No warmup ("none", k <= 1 or
    W = 0) is 0 steps. This is the one place the count is derived; the
    trainer reports it.

    Example:
      >>> warmup_steps(batch_size=1024, steps_per_epoch=3, reference_batch_size=64,
      ...              warmup_epochs=5 / 6)
      3
    """
    if warmup == "none" or batch_size <= reference_batch_size:
        return 0
    return math.ceil(warmup_epochs * steps_per_epoch)


def _check_schedule_arguments(*, base_lr, batch_size, steps_per_epoch, reference_batch_size,
                              warmup, warmup_epochs, decay_epochs,
                              decay_factor) -> tuple[float, ...]:
    """goyal_schedule's argument checks (a direct call has no Plan); the decay epochs as a tuple."""
    _check_positive("base_lr", base_lr)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("steps_per_epoch", steps_per_epoch, integer=True)
    _check_positive("reference_batch_size", reference_batch_size, integer=True)
    if warmup not in WARMUP_KINDS:
        raise ValueError(f"warmup must be one of {WARMUP_KINDS}, got {warmup!r}")
    checks.real("warmup_epochs", warmup_epochs, low=0)
    decay_epochs = tuple(decay_epochs)
    for e in decay_epochs:
        checks.real(f"each of decay_epochs {decay_epochs!r}", e, low=0)
    if list(decay_epochs) != sorted(decay_epochs):
        raise ValueError(
            f"decay_epochs must be in increasing order, got {decay_epochs!r}"
        )
    _check_positive("decay_factor", decay_factor)
    return decay_epochs


def goyal_schedule(
    *,
    batch_size: int,
    steps_per_epoch: int,
    base_lr: float = 0.1,
    reference_batch_size: int = 256,
    warmup_epochs: float = 5,
    warmup: str = "gradual",
    decay_epochs: Sequence[float] = (30, 60, 80),
    decay_factor: float = 0.1,
) -> optax.Schedule:
    """The paper's learning-rate schedule: linear scaling, warmup, step decay.

    With η = ``base_lr``, k = ``batch_size / reference_batch_size``,
    W = ``warmup_epochs * steps_per_epoch`` and epoch = ``step // steps_per_epoch``::

      gradual  (sec. 2.2):  lr(t) = η + (kη − η) · t / W         for t < W
      constant (sec. 2.2):  lr(t) = η                            for t < W
      none:                 no warmup
      t >= W   (sec. 5.1):  lr(t) = kη · decay_factor ** #{e in decay_epochs : e <= epoch}

    Gradual warmup starts at η, not at 0, and adds the same increment every
    iteration. A decay epoch e takes effect at the first step t >= e · steps_per_epoch,
    which for a whole number e is the first step of epoch e; fractional epochs
    (short runs) work the same way. When k <= 1 there is nothing to warm up and the schedule is kη
    (decayed) from step 0.

    The schedule is a pure function of the step, so a run resumed at any step
    gets the same rate, and it is jittable on a traced integer step.

    Args:
      batch_size: total minibatch kn over all workers.
      steps_per_epoch: iterations per epoch at this minibatch.
      base_lr: η, the rate for ``reference_batch_size`` (the paper: 0.1).
      reference_batch_size: the minibatch η was tuned for (the paper: 256).
      warmup_epochs: warmup length in epochs (the paper: 5).
      warmup: "gradual", "constant" or "none".
      decay_epochs: epochs at which the rate is multiplied by ``decay_factor``,
        in increasing order (the paper: 30, 60, 80).
      decay_factor: multiplier at each decay epoch (the paper: 0.1).

    Returns:
      An ``optax.Schedule``: step -> float32 learning rate.

    Example:
      >>> lr = goyal_schedule(batch_size=8192, steps_per_epoch=156)
      >>> round(float(lr(0)), 6), round(float(lr(5 * 156)), 6)  # float32 inside
      (0.1, 3.2)

    References:
      Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
      1 Hour", sections 2.1, 2.2, 5.1.
    """
    decay_epochs = _check_schedule_arguments(
        base_lr=base_lr, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
        reference_batch_size=reference_batch_size, warmup=warmup, warmup_epochs=warmup_epochs,
        decay_epochs=decay_epochs, decay_factor=decay_factor)

    k = batch_size / reference_batch_size
    peak = base_lr * k
    if warmup_steps(batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                    reference_batch_size=reference_batch_size, warmup_epochs=warmup_epochs,
                    warmup=warmup) == 0:
        warmup = "none"
    span = warmup_epochs * steps_per_epoch  # W, possibly fractional
    # Decayed rates computed once in float64 so each table entry is the
    # correctly rounded float32 of kη · decay_factor**i.
    table = jnp.asarray(
        [peak * decay_factor**i for i in range(len(decay_epochs) + 1)], jnp.float32
    )
    # Decay boundaries as integer steps: the first step t with t >= e·steps_per_epoch.
    boundaries = jnp.asarray([math.ceil(e * steps_per_epoch) for e in decay_epochs], jnp.int32)

    def schedule(step):
        step = jnp.asarray(step)
        if boundaries.size:
            num_decays = jnp.sum(boundaries <= step, dtype=jnp.int32)
        else:
            num_decays = jnp.zeros((), jnp.int32)
        lr = table[num_decays]
        if warmup == "none":
            return lr
        in_warmup = step.astype(jnp.float32) < span
        if warmup == "constant":
            warm = jnp.float32(base_lr)
        else:  # gradual
            # The per-iteration increment, rounded once from float64.
            increment = jnp.float32((peak - base_lr) / span)
            warm = jnp.float32(base_lr) + increment * step.astype(jnp.float32)
        return jnp.where(in_warmup, warm, lr)

    return schedule


def _warmup_rate(step, *, warmup: str, base_lr: float, peak: float, span: float):
    """The warmup's rate at ``step`` (float32) for "gradual" or "constant"."""
    if warmup == "constant":
        return jnp.float32(base_lr)
    increment = jnp.float32((peak - base_lr) / span)  # rounded once from float64
    return jnp.float32(base_lr) + increment * step.astype(jnp.float32)


def poly_schedule(
    *,
    batch_size: int,
    steps_per_epoch: int,
    epochs: float,
    base_lr: float = 0.1,
    reference_batch_size: int = 256,
    warmup_epochs: float = 5,
    warmup: str = "gradual",
    power: float = 2.0,
    end_lr: float = 1e-4,
) -> optax.Schedule:
    """Linear scaling and the paper's warmup, then a polynomial decay to ``end_lr``.

    With kη, W and the warmup kinds of :func:`goyal_schedule`, and T = ``epochs *
    steps_per_epoch``::

      t < W:        the warmup of goyal_schedule (gradual from η, constant η)
      W <= t < T:   lr(t) = end + (kη − end) · (1 − (t − W) / (T − W)) ** power
      t >= T:       lr(t) = end

    W is 0 when there is no warmup ("none", or k <= 1). A run cut short by
    ``--num-steps`` stops part-way down the same curve.

    Args:
      batch_size, steps_per_epoch, base_lr, reference_batch_size, warmup_epochs,
        warmup: as in :func:`goyal_schedule`.
      epochs: the run's length; the decay ends there.
      power: the polynomial's power (the large-batch recipes: 2).
      end_lr: the rate at the end, at most kη.

    Returns:
      An ``optax.Schedule``: step -> float32 learning rate.

    Example:
      >>> lr = poly_schedule(batch_size=1024, steps_per_epoch=2, epochs=4, warmup_epochs=1,
      ...                    end_lr=0.04)
      >>> [round(float(lr(t)), 4) for t in (0, 1, 2, 5, 8)]
      [0.1, 0.25, 0.4, 0.13, 0.04]
    """
    _check_schedule_arguments(
        base_lr=base_lr, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
        reference_batch_size=reference_batch_size, warmup=warmup, warmup_epochs=warmup_epochs,
        decay_epochs=(), decay_factor=1.0)
    _check_positive("epochs", epochs)
    _check_positive("power", power)
    peak = scaled_learning_rate(base_lr, batch_size, reference_batch_size)
    checks.real("end_lr (0 to the peak rate kη)", end_lr, low=0, high=peak)
    if warmup_steps(batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                    reference_batch_size=reference_batch_size, warmup_epochs=warmup_epochs,
                    warmup=warmup) == 0:
        warmup = "none"
    span = 0.0 if warmup == "none" else warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if total <= span:
        raise ValueError(f"epochs ({epochs:g}) must be longer than warmup_epochs "
                         f"({warmup_epochs:g}) for a decay to follow the warmup")

    def schedule(step):
        step = jnp.asarray(step)
        t = step.astype(jnp.float32)
        progress = jnp.clip((t - jnp.float32(span)) / jnp.float32(total - span), 0.0, 1.0)
        lr = jnp.float32(end_lr) + jnp.float32(peak - end_lr) * (1.0 - progress) ** power
        if warmup == "none":
            return lr
        warm = _warmup_rate(step, warmup=warmup, base_lr=base_lr, peak=peak, span=span)
        return jnp.where(t < span, warm, lr)

    return schedule
