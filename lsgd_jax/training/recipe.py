"""The run's schedule and optimizer, built from its config and plan.

``--schedule steps`` is the paper's (:func:`lsgd_jax.goyal_schedule`),
``--schedule poly`` the polynomial decay of the later large-batch recipes
(:func:`lsgd_jax.poly_schedule`); ``--optimizer sgd`` is the paper's
(:func:`lsgd_jax.goyal_sgd`), ``--optimizer lars`` adds the per-tensor trust ratio
(:func:`lsgd_jax.rules.lars`). Both optimizers share the momentum form, Nesterov, λ and
the mask of the config, so choosing one changes only the trust ratio.
"""

from __future__ import annotations

from typing import Callable

import optax

from lsgd_jax.rules.lars import lars
from lsgd_jax.rules.optim import goyal_sgd
from lsgd_jax.rules.schedules import goyal_schedule, poly_schedule
from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.plan import Plan


def build_schedule(config: TrainConfig, plan: Plan) -> optax.Schedule:
    """The learning rate by step, from the config's rules and the plan's kn and steps."""
    common = dict(batch_size=plan.global_batch_size, steps_per_epoch=plan.steps_per_epoch,
                  base_lr=config.base_lr, reference_batch_size=config.reference_batch_size,
                  warmup_epochs=config.warmup_epochs, warmup=config.warmup)
    if config.schedule == "poly":
        return poly_schedule(epochs=config.epochs, power=config.poly_power,
                             end_lr=config.end_lr, **common)
    return goyal_schedule(decay_epochs=config.decay_epochs, decay_factor=config.decay_factor,
                          **common)


def build_optimizer(config: TrainConfig, schedule: Callable) -> optax.GradientTransformation:
    """goyal_sgd or lars at ``schedule`` with the config's momentum and decay."""
    common = dict(momentum=config.momentum, nesterov=config.nesterov,
                  weight_decay=config.weight_decay, form=config.momentum_form,
                  momentum_correction=config.momentum_correction)
    if config.optimizer == "lars":
        return lars(schedule, trust_coefficient=config.trust_coefficient, **common)
    return goyal_sgd(schedule, **common)


def build(config: TrainConfig, plan: Plan) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """``(schedule, tx)`` of a run."""
    schedule = build_schedule(config, plan)
    return schedule, build_optimizer(config, schedule)
