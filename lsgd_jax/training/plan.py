"""The plan of a run: every value that follows from the config, the mesh and the data.

Built once, by :func:`make_plan`, after the mesh and the training set are known
and before anything is compiled; every consistency check of a run lives here, and
each error names the flag to change. The schedule, the data iterator and the step
take the plan's values and do not derive them again. ``config.json`` and the start
line print it.

    kn = devices × K × microbatch,  microbatch = (microbatch / n) BN groups of n
    k  = kn / n BN workers (the paper's k; section 3)
    η̂  = η · kn / reference kn (eq. 5, the linear scaling rule)
    steps per epoch = ⌊N / kn⌋ (Remark 4: the last N mod kn shuffled examples wait)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lsgd_jax.engine.layout import BatchLayout, validate_batch_layout
from lsgd_jax.rules.schedules import scaled_learning_rate, warmup_steps
from lsgd_jax.training.config import MAX_STEPS, TrainConfig, evaluation_steps
from lsgd_jax.training.metrics import plural


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run does, in steps and images; see the module docstring."""

    global_batch_size: int         # kn
    bn_group_size: int             # n
    num_bn_workers: int            # k = kn / n
    grad_accum_steps: int          # K
    num_devices: int
    num_processes: int
    per_device_batch: int          # kn / devices
    per_process_batch: int         # kn / processes
    microbatch: int                # kn / (devices · K)
    num_train_examples: int        # N
    examples_left_out_per_epoch: int  # N mod kn
    steps_per_epoch: int
    planned_steps: int             # ⌈epochs · steps per epoch⌉
    total_steps: int               # planned, or fewer with --num-steps
    warmup_steps: int
    decay_steps: tuple[int, ...]
    peak_lr: float
    rate_multiplier: float         # kn / reference kn
    eval_steps: tuple[int, ...]
    eval_batch_size: int
    recipe: str = ""               # the optimizer and schedule in words (TrainConfig.recipe)

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(global_batch_size=self.global_batch_size,
                           num_devices=self.num_devices, grad_accum_steps=self.grad_accum_steps,
                           bn_group_size=self.bn_group_size, per_device=self.per_device_batch,
                           microbatch=self.microbatch, num_bn_workers=self.num_bn_workers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def describe(self, warmup: str) -> str:
        """The start line: what one step is, and how long the run is."""
        return (
            f"kn={self.global_batch_size} (k={self.num_bn_workers} BN workers of "
            f"n={self.bn_group_size}) on {plural(self.num_devices, 'device')} in "
            f"{plural(self.num_processes, 'process')}, {self.per_device_batch} images per "
            f"device in {plural(self.grad_accum_steps, 'microbatch')}; {self.steps_per_epoch} "
            f"steps per epoch, {self.total_steps} steps; peak rate {self.peak_lr:g} after "
            f"{plural(self.warmup_steps, 'warmup step')} ({warmup}); each epoch leaves out the "
            f"last {self.examples_left_out_per_epoch} of its {self.num_train_examples} shuffled "
            "examples (N mod kn)" + (f"; {self.recipe}" if self.recipe else ""))


def make_plan(config: TrainConfig, *, num_train_examples: int, num_devices: int,
              num_processes: int = 1) -> Plan:
    """Check that ``config`` fits the mesh and the data, and derive the run's plan.

    Raises:
      ValueError: naming the flag to change and what would be valid.
    """
    layout = validate_batch_layout(
        global_batch_size=config.batch_size, num_devices=num_devices,
        grad_accum_steps=config.grad_accum_steps, bn_group_size=config.bn_group_size,
        num_processes=num_processes, flags=True)
    kn, n, K = layout.global_batch_size, layout.bn_group_size, layout.grad_accum_steps
    eval_batch = config.eval_batch_size or kn
    if eval_batch % num_devices or eval_batch % num_processes:
        raise ValueError(
            f"--eval-batch-size {eval_batch} must be divisible by the "
            f"{plural(num_devices, 'device')} and the {plural(num_processes, 'process')}; use "
            f"a multiple of {num_devices}")
    spe = num_train_examples // kn
    if spe < 1:
        raise ValueError(f"--batch-size {kn} is larger than the training set "
                         f"({num_train_examples} examples); use at most {num_train_examples}")
    planned = math.ceil(config.epochs * spe)
    total = planned if config.num_steps is None else min(config.num_steps, planned)
    warm = warmup_steps(batch_size=kn, steps_per_epoch=spe,
                        reference_batch_size=config.reference_batch_size,
                        warmup_epochs=config.warmup_epochs, warmup=config.warmup)
    decays = (tuple(math.ceil(e * spe) for e in config.decay_epochs)
              if config.schedule == "steps" else ())
    _check_step_counts(config, spe, planned=planned, warm=warm, decays=decays)
    return Plan(
        global_batch_size=kn, bn_group_size=n, num_bn_workers=kn // n, grad_accum_steps=K,
        num_devices=num_devices, num_processes=num_processes, per_device_batch=kn // num_devices,
        per_process_batch=kn // num_processes, microbatch=layout.microbatch,
        num_train_examples=num_train_examples, examples_left_out_per_epoch=num_train_examples % kn,
        steps_per_epoch=spe, planned_steps=planned, total_steps=total,
        warmup_steps=warm, decay_steps=decays,
        peak_lr=scaled_learning_rate(config.base_lr, kn, config.reference_batch_size),
        rate_multiplier=kn / config.reference_batch_size,
        eval_steps=tuple(evaluation_steps(total_steps=total, steps_per_epoch=spe,
                                          eval_every_epochs=config.eval_every_epochs,
                                          median_evals=config.median_evals)),
        eval_batch_size=eval_batch,
        recipe=config.recipe(tuple(e for e, d in zip(config.decay_epochs, decays) if d < total)))


def plan_warnings(config: TrainConfig, plan: Plan) -> list[str]:
    """One line for each part of the schedule that the run is too short to reach: a warmup
    longer than the run, a decay at or past its last step."""
    lines = []
    if plan.warmup_steps > plan.planned_steps:
        lines.append(
            f"warning: the warmup ({plan.warmup_steps} steps, --warmup-epochs "
            f"{config.warmup_epochs:g}) is longer than the run ({plan.planned_steps} steps, "
            f"--epochs {config.epochs:g}): the rate never reaches its peak {plan.peak_lr:g}")
    # The decay at step d applies from step d on (0-based): it never does when d >= total.
    late = [(e, d) for e, d in zip(config.decay_epochs, plan.decay_steps)
            if d >= plan.total_steps]
    if late:
        epochs = ", ".join(f"{e:g}" for e, _ in late)
        s, verb = ("s", "are") if len(late) > 1 else ("", "is")
        lines.append(
            f"warning: the decay{s} at epoch{s} {epochs} (step{s} "
            f"{', '.join(str(d) for _, d in late)}, --decay-epochs) {verb} at or past the end "
            "of the run "
            f"({plan.total_steps} steps, --epochs {config.epochs:g}"
            + (f", --num-steps {config.num_steps}" if plan.total_steps < plan.planned_steps
               else "") + "): the rate never decays there")
    return lines


def _check_step_counts(config: TrainConfig, spe: int, *, planned: int, warm: int,
                       decays: tuple[int, ...]) -> None:
    """Every length in steps fits the int32 step counter and schedule boundaries (the
    flags' own bounds cannot know the steps per epoch)."""
    for flag, epochs, steps in (("--epochs", config.epochs, planned),
                                ("--warmup-epochs", config.warmup_epochs, warm),
                                ("--decay-epochs", max(config.decay_epochs, default=0),
                                 max(decays, default=0))):
        if steps > MAX_STEPS:
            raise ValueError(
                f"{flag} {epochs:g} is {steps} steps at {spe} steps per epoch (--batch-size "
                f"{config.batch_size}); a run counts at most {MAX_STEPS} steps: use fewer "
                "epochs or a larger --batch-size")
