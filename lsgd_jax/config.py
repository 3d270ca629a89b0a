"""The training configuration: the paper's defaults in one place, and what follows from them.

Every hyper-parameter of a run lives in :class:`TrainConfig`; step functions
receive values from it and hard-code none. Durations are in epochs (as in the
paper) and turned into steps by :meth:`TrainConfig.derived`, once the size of
the training set is known, so one configuration holds at every minibatch.
Validation is pure Python on the configuration, so every process raises the
same error before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from lsgd_jax.schedules import WARMUP_KINDS, scaled_learning_rate, warmup_steps

DATA_NAMES = ("imagenet", "synthetic", "fashion_mnist")
DTYPES = ("bfloat16", "float32")
MODEL_NAMES = ("resnet8", "resnet18", "resnet20", "resnet34", "resnet50", "resnet101")
MOMENTUM_FORMS = ("eq9", "eq10")
# Model per data set when --model is not given.
DEFAULT_MODELS = {"imagenet": "resnet50", "synthetic": "resnet50", "fashion_mnist": "resnet20"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run; defaults are the paper's ImageNet recipe (section 5.1).

    Attributes:
      data: "imagenet", "synthetic" (deterministic in (seed, step)) or "fashion_mnist".
      data_dir: where the data set lives (None: the source's default).
      tfds_name: the tfds builder read by ``data="imagenet"`` (any data set with
        imagenet2012's ``image``/``label`` features).
      model: "resnet50", "resnet18", "resnet34", "resnet101" or "resnet20";
        None picks by data set (resnet20 for fashion_mnist, else resnet50).
      image_size: input side in pixels (None: the data set's, 224 for ImageNet).
      batch_size: kn, the minibatch over all workers.
      bn_group_size: n, the images per BatchNorm worker (the paper: 32).
      grad_accum_steps: microbatches per device per step (footnote 5).
      epochs: training length (the paper: 90).
      num_steps: stop after this many steps in all (smoke runs); None: epochs.
      base_lr: η for ``reference_batch_size`` (the paper: 0.1 per 256).
      warmup, warmup_epochs: "gradual"/"constant"/"none", and its length (5).
      decay_epochs, decay_factor: step decay (30, 60, 80; ×0.1).
      momentum, nesterov, momentum_form, momentum_correction: eqs. (9)/(10).
      weight_decay: λ of the L2 term, not on BN γ/β (1e-4).
      zero_init_residual: γ = 0 on the last BN of each residual block.
      dtype: compute dtype; parameters and optimizer state stay float32.
      allreduce: gradient all-reduce, "psum" (XLA's) or a name from
        ``lsgd_jax.collectives``.
      seed: seeds initialization, shuffles and augmentation.
      checkpoint_every_steps: 0 = at the end of every epoch only.
      keep_checkpoints: how many recent checkpoints to keep.
      keep_every_epochs: also keep one checkpoint every this many epochs (0: none).
      eval_every_epochs: full validation cadence (the paper: every epoch).
      median_evals: the reported figure is the median top-1 error of this many
        evaluations spread over the last median_evals/90 of the run, one per
        90th (the paper: the last 5 of 90 epochs; a 90-epoch run evaluates at
        its last 5 epoch ends anyway, a 2-epoch run also at epochs 1.91 ... 1.98).
      eval_batch_size: global batch of the validation pass (None: batch_size).
      log_every_steps: console and metrics cadence.
      num_workers: decoding threads per process (ImageNet).
      max_bad_fraction: fail when more than this fraction of images is corrupt.
      color_jitter, lighting: fb.resnet.torch's colour jitter strength (0.4) and PCA
        lighting std (0.1) for ImageNet training images; 0 (off) by default, as the
        paper names only scale and aspect-ratio augmentation and the flip.
      synthetic_examples, synthetic_eval_examples: sizes of the synthetic splits.
    """

    data: str = "synthetic"
    data_dir: str | None = None
    tfds_name: str = "imagenet2012"
    model: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    bn_group_size: int = 32
    grad_accum_steps: int = 1
    epochs: float = 90
    num_steps: int | None = None
    base_lr: float = 0.1
    reference_batch_size: int = 256
    warmup: str = "gradual"
    warmup_epochs: float = 5
    decay_epochs: tuple[float, ...] = (30, 60, 80)
    decay_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    momentum_form: str = "eq9"
    momentum_correction: bool = True
    weight_decay: float = 1e-4
    zero_init_residual: bool = True
    dtype: str = "bfloat16"
    allreduce: str = "psum"
    seed: int = 0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3
    keep_every_epochs: int = 10
    eval_every_epochs: int = 1
    median_evals: int = 5
    eval_batch_size: int | None = None
    log_every_steps: int = 50
    num_workers: int = 8
    max_bad_fraction: float = 1e-3
    color_jitter: float = 0.0
    lighting: float = 0.0
    synthetic_examples: int = 1_281_167
    synthetic_eval_examples: int = 50_000

    def __post_init__(self):
        object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
        if self.model is None:
            object.__setattr__(self, "model", DEFAULT_MODELS.get(self.data, "resnet50"))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the first bad value and what would be valid."""
        _choice("data", self.data, DATA_NAMES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("warmup", self.warmup, WARMUP_KINDS)
        _choice("momentum_form", self.momentum_form, MOMENTUM_FORMS)
        _choice("model", self.model, MODEL_NAMES)
        for name in ("batch_size", "bn_group_size", "grad_accum_steps", "reference_batch_size",
                     "keep_checkpoints", "eval_every_epochs", "median_evals", "log_every_steps", "num_workers",
                     "synthetic_examples", "synthetic_eval_examples"):
            _positive_int(name, getattr(self, name))
        for name in ("checkpoint_every_steps", "keep_every_epochs", "seed"):
            _non_negative_int(name, getattr(self, name))
        for name in ("image_size", "num_steps", "eval_batch_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_float("epochs", self.epochs)
        _positive_float("base_lr", self.base_lr)
        _positive_float("decay_factor", self.decay_factor)
        _non_negative_float("warmup_epochs", self.warmup_epochs)
        _non_negative_float("weight_decay", self.weight_decay)
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("color_jitter", "lighting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1) (fb.resnet.torch: color_jitter 0.4, "
                                 f"lighting 0.1), got {value!r}")
        if not (isinstance(self.max_bad_fraction, (int, float)) and 0 <= self.max_bad_fraction < 1):
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction!r}")
        if list(self.decay_epochs) != sorted(self.decay_epochs) or any(
            not isinstance(e, (int, float)) or e < 0 for e in self.decay_epochs
        ):
            raise ValueError(
                f"decay_epochs must be non-negative and increasing, got {self.decay_epochs!r}"
            )
        if not isinstance(self.tfds_name, str) or not self.tfds_name:
            raise ValueError(f"tfds_name must be a non-empty name, got {self.tfds_name!r}")
        from lsgd_jax.collectives import ALLREDUCE_NAMES

        _choice("allreduce", self.allreduce, ALLREDUCE_NAMES)

    # --------------------------------------------------------------- derived
    def derived(self, num_train_examples: int) -> dict[str, Any]:
        """Values that follow from the config and the training-set size."""
        steps_per_epoch = num_train_examples // self.batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the training set "
                f"({num_train_examples} examples); use at most {num_train_examples}"
            )
        epoch_steps = math.ceil(self.epochs * steps_per_epoch)
        total = epoch_steps if self.num_steps is None else min(self.num_steps, epoch_steps)
        return {
            "kn": self.batch_size,
            "rate_multiplier": self.batch_size / self.reference_batch_size,
            "num_train_examples": num_train_examples,
            # Remark 4's permutation is cut into whole minibatches: the last
            # N mod kn examples of each epoch's shuffle are not visited that epoch.
            "examples_left_out_per_epoch": num_train_examples % self.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "peak_lr": scaled_learning_rate(self.base_lr, self.batch_size, self.reference_batch_size),
            "warmup_steps": warmup_steps(
                batch_size=self.batch_size, steps_per_epoch=steps_per_epoch,
                reference_batch_size=self.reference_batch_size,
                warmup_epochs=self.warmup_epochs, warmup=self.warmup),
            "decay_steps": [math.ceil(e * steps_per_epoch) for e in self.decay_epochs],
            "eval_steps": evaluation_steps(
                total_steps=total, steps_per_epoch=steps_per_epoch,
                eval_every_epochs=self.eval_every_epochs, median_evals=self.median_evals),
            "num_bn_workers": self.batch_size // self.bn_group_size,
        }

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decay_epochs"] = list(self.decay_epochs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


PAPER_EPOCHS = 90  # the paper's budget; the median's evaluations are 90ths of a run


def evaluation_steps(*, total_steps: int, steps_per_epoch: int, eval_every_epochs: int,
                     median_evals: int) -> list[int]:
    """The steps after which a run evaluates, in increasing order.

    Every ``eval_every_epochs`` epochs, and ``median_evals`` points one 90th
    of the run apart (in whole steps, at least one apart) that end at the last
    step. The paper reports the median of the last 5 of 90 epochs, so a run of
    any length reports the median over the same share of it; at 90 epochs the
    points are the last 5 epoch ends.

    Example:
      >>> evaluation_steps(total_steps=234, steps_per_epoch=117, eval_every_epochs=1,
      ...                  median_evals=5)
      [117, 224, 226, 229, 231, 234]
    """
    every = eval_every_epochs * steps_per_epoch
    steps = set(range(every, total_steps + 1, every))
    spacing = total_steps / PAPER_EPOCHS
    for i in range(median_evals):
        steps.add(total_steps - max(round(i * spacing), i))
    return sorted(s for s in steps if s >= 1)


# Fields that must match between a checkpoint and the run resuming from it:
# they change the shapes of the state or the meaning of the saved position.
RESUME_FIELDS = ("data", "tfds_name", "model", "image_size", "batch_size", "seed", "synthetic_examples",
                 "momentum_form")


def _choice(name, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _positive_float(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _non_negative_float(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
