"""The training configuration: the paper's defaults in one place, and what follows from them.

Every hyper-parameter of a run lives in :class:`TrainConfig`; step functions
receive values from it and hard-code none. Durations are in epochs (as in the
paper) and turned into steps by :func:`lsgd_jax.training.plan.make_plan`, once the mesh and
the size of the training set are known, so one configuration holds at every minibatch.
Validation is pure Python on the configuration, so every process raises the
same error before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lsgd_jax.base.checks as checks
from lsgd_jax.data.source import SOURCE_NAMES
from lsgd_jax.models import DTYPES, MODEL_NAMES
from lsgd_jax.models.grouped_bn import BN_IMPLS, DEFAULT_SPLIT_ROWS
from lsgd_jax.models.pooling import POOL_IMPLS
from lsgd_jax.models.resnet import CIFAR_STEM_MODELS
from lsgd_jax.models.stem import STEM_IMPLS
from lsgd_jax.rules.optim import MOMENTUM_FORMS
from lsgd_jax.rules.schedules import SCHEDULE_KINDS, WARMUP_KINDS

OPTIMIZERS = ("sgd", "lars")  # goyal_sgd, lsgd_jax.rules.lars.lars

# Model per data set when --model is not given.
DEFAULT_MODELS = {"imagenet": "resnet50", "folder": "resnet50", "synthetic": "resnet50",
                  "fashion_mnist": "resnet20"}


def _allreduce_names() -> tuple[str, ...]:
    from lsgd_jax.collectives import ALLREDUCE_NAMES  # imported on use: it imports jax's shard_map

    return ALLREDUCE_NAMES


# Bounds of the numeric flags. Past them a value is a typo that would overflow a counter,
# allocate without bound or fail deep inside JAX; each is refused before anything starts.
MAX_STEPS = 2**31 - 1         # the step counter and the schedule's boundaries are int32
MAX_EPOCHS = 100_000
MAX_BATCH = 2**20             # kn, n, K, the eval batch and predict's batch
MAX_EXAMPLES = 100_000_000    # a synthetic data set (an index array of its size per epoch)
MAX_CLASSES = 1_000_000
MAX_SEED = 2**32 - 1
MAX_RATE = 1000               # base and end rates, trust coefficient, poly power
MAX_THREADS = 1024            # decoding threads and workers, fake CPU devices
MAX_IMAGE_SIZE = 65_536       # the ceiling of --max-image-size itself
PAPER_EPOCHS = 90  # the paper's budget; the median's evaluations are 90ths of a run


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# The flags' groups in --help and in the start-up config, essentials first.
GROUPS = {"essentials": "essentials", "run": "run", "data": "data", "model": "model",
          "minibatch": "minibatch (kn = k workers × n images)", "schedule": "schedule",
          "optimizer": "optimizer", "checkpoints and logging": "checkpoints and logging",
          "speed": "speed (the same results computed another way; see the README)"}


def as_typed(value: Any) -> str:
    """A flag's value as it is typed on the command line: ``30,60,80``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(as_typed(v) for v in value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 2, not 2.0
    return str(value)


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag: finite, from ``low`` to ``high`` (an open end
    leaves its bound out), integers when ``integer``. A value above ``warn_above`` is
    valid but implausible: it gets a one-line warning. ``note`` is added to the error."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    warn_above: float | None = None
    note: str = ""

    def describe(self) -> str:
        """E.g. "an integer in [1, 1048576]", "a number in (0, 1000]"."""
        return (("an integer" if self.integer else "a number") + " in "
                + ("(" if self.open_low else "[") + _number_text(self.low) + ", "
                + _number_text(self.high) + (")" if self.open_high else "]"))

    def contains(self, value: Any) -> bool:
        if not (checks.is_integer(value) if self.integer else checks.is_real(value)):
            return False
        # The bounds are finite, so inf is outside; nan fails every comparison.
        return ((value > self.low if self.open_low else value >= self.low)
                and (value < self.high if self.open_high else value <= self.high))

    def check(self, flag: str, value: Any) -> None:
        """Raise ValueError naming ``flag``, the range and ``value`` when it is outside."""
        if not self.contains(value):
            note = f" ({self.note})" if self.note else ""
            raise ValueError(f"{flag} must be {self.describe()}{note}, got {value!r}")

    def warning(self, flag: str, value: Any) -> str:
        """One line when a valid ``value`` is above the plausible range, else ""."""
        if self.warn_above is None or value is None or value <= self.warn_above:
            return ""
        return (f"warning: {flag} {_number_text(value)} is above the usual range (at most "
                f"{_number_text(self.warn_above)}); the run goes on with it")


# Why color_jitter and lighting stop below 1: the strengths of the recipe they come from.
_FB_AUGMENT = "fb.resnet.torch: color_jitter 0.4, lighting 0.1"


def _ints(low: int, high: int) -> Range:
    return Range(low, high, integer=True)


def _field(default: Any, group: str, help: str, *, choices: Any = None, flag: str | None = None,
           default_text: str | None = None, valid: Range | None = None) -> Any:
    """A config field with its command-line help: ``lsgd_jax.cli.train`` makes one flag of each.

    ``choices``: the valid values (a tuple, or a function returning the owner's tuple);
    ``flag``: the flag's name when it is not ``--field-name``; ``default_text``: what the
    help says for a default that depends on other values; ``valid``: a numeric field's
    range, which :meth:`TrainConfig.validate` holds it to.
    """
    return dataclasses.field(default=default, metadata={
        "group": group, "help": help, "choices": choices, "flag": flag,
        "default_text": default_text, "valid": valid})


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field; errors name it."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run; defaults are the paper's ImageNet recipe (section 5.1).

    Each field's help (``dataclasses.fields(TrainConfig)[i].metadata["help"]``) is also
    the ``--help`` of its flag, which ``lsgd_jax.cli.train`` generates from these fields.
    """

    seed: int = _field(0, "run", "initialization, shuffles, augmentation", valid=_ints(0, MAX_SEED))
    data: str = _field("synthetic", "data", "synthetic is deterministic in (seed, step) and "
                       "needs no files", choices=SOURCE_NAMES)
    data_dir: str | None = _field(None, "data", "folder with train/<class>/* and val/ "
                                  "(folder; imagenet too, else its tfds data dir) or of the "
                                  "IDX files (fashion_mnist)", default_text="the source's")
    val_labels: str | None = _field(None, "data", "labels of a flat val/ folder: Kaggle's "
                                    "LOC_val_solution.csv, `file class` lines, or one class a "
                                    "line in sorted file order",
                                    default_text="a LOC_val_solution.csv in DATA_DIR or up "
                                    "to three folders above it, or for imagenet the "
                                    "validation_labels.txt of an installed tfds")
    relist: bool = _field(False, "data", "list the folder's files again instead of trusting "
                          "the index kept in the workdir (which a run checks against the "
                          "folders' modification times) (true/false)")
    tfds_name: str = _field("imagenet2012", "data", "tfds builder read by --data imagenet (any "
                            "data set with imagenet2012's image/label features)")
    image_size: int | None = _field(None, "data", "input side in pixels",
                                    default_text="the data set's, 224 for ImageNet",
                                    valid=Range(1, MAX_IMAGE_SIZE, integer=True,
                                                note="and at most --max-image-size"))
    max_image_size: int = _field(1024, "data", "the largest --image-size accepted (larger "
                                 "is most likely a typo; raise this to train on such images)",
                                 valid=_ints(1, MAX_IMAGE_SIZE))
    decode_threads: int = _field(8, "data", "image-decoding threads per process (ImageNet, "
                                 "folders) when --decode-workers is 0",
                                 valid=_ints(1, MAX_THREADS))
    decode_workers: int | None = _field(None, "data", "ImageNet and folder data: decoding "
                                        "worker processes per process for the train and the "
                                        "evaluation batches (shared memory); 0: threads in "
                                        "the training process",
                                        default_text="cores - 1 with 4 or more cores, else 0; the "
                                        "cores this process may run on, shared with the "
                                        "host's other processes that the launcher announces",
                                        valid=_ints(0, MAX_THREADS))
    resizer: str = _field("auto", "data", "ImageNet train crop resize: opencv (faster, "
                          "~2 levels from pil's pixels), pil, auto: opencv if installed",
                          choices=("auto", "opencv", "pil"))
    max_bad_fraction: float = _field(1e-3, "data", "fail when more than this fraction of "
                                     "images cannot be read or decoded",
                                     valid=Range(0, 1, open_high=True))
    color_jitter: float = _field(0.0, "data", "ImageNet: brightness/contrast/saturation jitter "
                                 "strength (fb.resnet.torch: 0.4; the paper names none)",
                                 valid=Range(0, 1, open_high=True, note=_FB_AUGMENT))
    lighting: float = _field(0.0, "data", "ImageNet: PCA lighting noise std (fb.resnet.torch: "
                             "0.1)", valid=Range(0, 1, open_high=True, note=_FB_AUGMENT))
    synthetic_examples: int = _field(1_281_167, "data", "size of the synthetic training set",
                                     valid=_ints(1, MAX_EXAMPLES))
    synthetic_eval_examples: int = _field(50_000, "data", "size of the synthetic validation set",
                                          valid=_ints(1, MAX_EXAMPLES))
    model: str | None = _field(None, "model", "the ResNet", choices=MODEL_NAMES,
                               default_text="resnet50, or resnet20 for --data fashion_mnist")
    dtype: str = _field("bfloat16", "model", "compute dtype; parameters and optimizer state "
                        "are float32", choices=DTYPES)
    zero_init_residual: bool = _field(True, "model", "γ=0 on the last BN of every residual "
                                      "block (zero-γ, section 5.1)", flag="--zero-gamma")
    num_classes: int | None = _field(None, "model", "classifier outputs; synthetic data draws "
                                     "its labels among them", default_text="the data set's",
                                     valid=_ints(1, MAX_CLASSES))
    init_from: str | None = _field(None, "model", "start from the weights of a file written by "
                                   "`lsgd-jax export` (fine-tuning: fresh optimizer and "
                                   "schedule; the classifier is re-initialised when the class "
                                   "count differs)")
    bn_impl: str = _field("plain", "speed", "how per-group BN statistics are reduced in "
                          "training: plain, split (two stages) or custom_vjp (split, with a "
                          "hand-written backward); the same results", choices=BN_IMPLS)
    bn_split_rows: int = _field(DEFAULT_SPLIT_ROWS, "speed", "--bn-impl split/custom_vjp: "
                                "rows reduced in the first stage (at most)",
                                valid=_ints(1, MAX_STEPS))
    pool_impl: str = _field("reduce_window", "speed", "the stem's max-pool: reduce_window "
                            "(nn.max_pool) or masks (an elementwise backward); the same "
                            "results", choices=POOL_IMPLS)
    stem_impl: str = _field("conv", "speed", "the stem's convolution: conv, pad4 (input "
                            "padded to 4 channels) or s2d (space-to-depth; ImageNet stem, "
                            "even image sizes); the same results", choices=STEM_IMPLS)
    batch_size: int = _field(256, "minibatch", "the global minibatch kn", valid=_ints(1, MAX_BATCH))
    bn_group_size: int = _field(32, "minibatch", "n: images per BatchNorm worker, independent "
                                "of the per-device batch (the paper: 32)",
                                valid=_ints(1, MAX_BATCH))
    grad_accum_steps: int = _field(1, "minibatch", "microbatches per device per step (BN per "
                                   "microbatch; footnote 5)", valid=_ints(1, MAX_BATCH))
    eval_batch_size: int | None = _field(None, "minibatch", "global batch of the validation "
                                         "pass", default_text="--batch-size",
                                         valid=_ints(1, MAX_BATCH))
    epochs: float = _field(90, "schedule", "training length in epochs (the paper: 90)",
                           valid=Range(0, MAX_EPOCHS, open_low=True))
    num_steps: int | None = _field(None, "schedule", "stop after this many steps in all "
                                   "(smoke runs)", default_text="all the epochs' steps",
                                   valid=_ints(1, MAX_STEPS))
    base_lr: float = _field(0.1, "schedule", "η per --reference-batch-size (the paper: 0.1 "
                            "per 256)", valid=Range(0, MAX_RATE, open_low=True, warn_above=10))
    reference_batch_size: int = _field(256, "schedule", "the minibatch --base-lr is for; the "
                                       "rate is base_lr · kn / this (eq. 5)",
                                       valid=_ints(1, MAX_BATCH))
    warmup: str = _field("gradual", "schedule", "gradual: from base_lr to the scaled rate by "
                         "equal steps; constant: base_lr, then a jump; none",
                         choices=WARMUP_KINDS)
    warmup_epochs: float = _field(5, "schedule", "warmup length (none when kn <= the "
                                  "reference batch)", valid=Range(0, MAX_EPOCHS))
    decay_epochs: tuple[float, ...] = _field((30, 60, 80), "schedule", "epochs of the ×"
                                             "decay_factor steps, comma-separated, e.g. 30,60,80",
                                             valid=Range(0, MAX_EPOCHS))
    decay_factor: float = _field(0.1, "schedule", "rate multiplier at each decay epoch",
                                 valid=Range(0, 1, open_low=True))
    schedule: str = _field("steps", "schedule", "after the warmup, steps: ×decay_factor at "
                           "--decay-epochs (the paper); poly: end_lr + (peak − end_lr)·"
                           "(1 − progress)^power to the last epoch", choices=SCHEDULE_KINDS)
    poly_power: float = _field(2.0, "schedule", "--schedule poly: the power (MLPerf's "
                               "large-batch recipes: 2)",
                               valid=Range(0, MAX_RATE, open_low=True, warn_above=10))
    end_lr: float = _field(1e-4, "schedule", "--schedule poly: the rate at the last step, "
                           "at most the peak rate", valid=Range(0, MAX_RATE, warn_above=10))
    optimizer: str = _field("sgd", "optimizer", "sgd: the paper's momentum SGD; lars: the "
                            "same with a per-tensor trust ratio on the kernels (You et al. "
                            "2017)", choices=OPTIMIZERS)
    trust_coefficient: float = _field(0.001, "optimizer", "--optimizer lars: η_tc of the "
                                      "trust ratio η_tc·‖w‖ / (‖g‖ + λ‖w‖)",
                                      valid=Range(0, MAX_RATE, open_low=True, warn_above=1))
    label_smoothing: float = _field(0.0, "optimizer", "α in [0, 1): cross-entropy against "
                                    "(1 − α)·onehot + α/classes (the paper: 0)",
                                    valid=Range(0, 1, open_high=True))
    momentum: float = _field(0.9, "optimizer", "m, in [0, 1)", valid=Range(0, 1, open_high=True))
    nesterov: bool = _field(True, "optimizer", "Nesterov momentum (true/false)")
    momentum_form: str = _field("eq9", "optimizer", "eq9: buffer without the rate; eq10: "
                                "buffer holds the rate", choices=MOMENTUM_FORMS)
    momentum_correction: bool = _field(True, "optimizer", "eq10 only: rescale the buffer "
                                       "when the rate changes (eq. 10's correction)")
    weight_decay: float = _field(1e-4, "optimizer", "λ of the L2 term, not on BN γ/β",
                                 valid=Range(0, 1, warn_above=0.1))
    allreduce: str = _field("psum", "optimizer", "psum (XLA's, the production choice) or one "
                            "of the paper's section-4 algorithms in lsgd_jax.collectives",
                            choices=_allreduce_names)
    checkpoint_every_steps: int = _field(0, "checkpoints and logging", "0: at the end of "
                                         "every epoch only", valid=_ints(0, MAX_STEPS))
    keep_checkpoints: int = _field(3, "checkpoints and logging", "how many of the latest "
                                   "checkpoints to keep", valid=_ints(1, MAX_STEPS))
    keep_every_epochs: int = _field(10, "checkpoints and logging", "also keep one checkpoint "
                                    "every this many epochs (0: none)", valid=_ints(0, MAX_EPOCHS))
    eval_every_epochs: int = _field(1, "checkpoints and logging", "full validation cadence; "
                                    "the last step is always evaluated", valid=_ints(1, MAX_EPOCHS))
    median_evals: int = _field(5, "checkpoints and logging", "the result is the median top-1 "
                               "error of this many evaluations, one every 90th of the run at "
                               "its end (the paper: the last 5 of 90 epochs)",
                               valid=_ints(1, PAPER_EPOCHS))
    log_every_steps: int = _field(50, "checkpoints and logging", "console, metrics.jsonl and "
                                  "TensorBoard cadence", valid=_ints(1, MAX_STEPS))

    def __post_init__(self):
        object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
        if self.model is None:
            object.__setattr__(self, "model", DEFAULT_MODELS.get(self.data, "resnet50"))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the first bad value and what would be valid."""
        _choice("data", self.data, SOURCE_NAMES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("warmup", self.warmup, WARMUP_KINDS)
        _choice("momentum_form", self.momentum_form, MOMENTUM_FORMS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULE_KINDS)
        _choice("model", self.model, MODEL_NAMES)
        _choice("bn_impl", self.bn_impl, BN_IMPLS)
        _choice("pool_impl", self.pool_impl, POOL_IMPLS)
        _choice("stem_impl", self.stem_impl, STEM_IMPLS)
        if self.stem_impl == "s2d" and self.model in CIFAR_STEM_MODELS:
            raise ValueError(f"stem_impl s2d rearranges the ImageNet stem (7x7 stride 2); "
                             f"model {self.model} has the CIFAR stem (3x3 stride 1): use "
                             "conv or pad4")
        _choice("resizer", self.resizer, ("auto", "opencv", "pil"))
        self._check_ranges()
        if self.image_size is not None and self.image_size > self.max_image_size:
            raise ValueError(f"--image-size {self.image_size} is larger than --max-image-size "
                             f"{self.max_image_size}; raise --max-image-size to train on images "
                             "this large")
        peak = self.base_lr * self.batch_size / self.reference_batch_size
        if self.schedule == "poly" and self.end_lr > peak:
            raise ValueError(f"end_lr must be in [0, {peak:g}] (0 to the peak rate base_lr · "
                             f"batch_size / reference_batch_size), got {self.end_lr!r}")
        if (self.schedule == "poly" and self.warmup != "none"
                and self.batch_size > self.reference_batch_size
                and self.warmup_epochs >= self.epochs):
            raise ValueError(f"--schedule poly decays after the warmup: warmup_epochs "
                             f"({self.warmup_epochs:g}) must be shorter than epochs "
                             f"({self.epochs:g})")
        if list(self.decay_epochs) != sorted(self.decay_epochs):
            raise ValueError(
                f"decay_epochs must be non-negative and increasing, got {self.decay_epochs!r}"
            )
        if self.init_from is not None and (not isinstance(self.init_from, str)
                                           or not self.init_from):
            raise ValueError(f"init_from must be the path of a model file, got "
                             f"{self.init_from!r}")
        if not isinstance(self.tfds_name, str) or not self.tfds_name:
            raise ValueError(f"tfds_name must be a non-empty name, got {self.tfds_name!r}")
        _choice("allreduce", self.allreduce, _allreduce_names())

    def _check_ranges(self) -> None:
        """Hold every numeric field to the range declared with it (each of a list's values;
        None, where it is the default, means "derived")."""
        for f in dataclasses.fields(self):
            valid, value = f.metadata["valid"], getattr(self, f.name)
            if valid is None or (value is None and f.default is None):
                continue
            if isinstance(value, tuple):
                if not all(valid.contains(v) for v in value):
                    raise ValueError(f"each of {flag_of(f)} must be {valid.describe()}, got "
                                     f"{value!r}")
            else:
                valid.check(flag_of(f), value)

    def warnings(self) -> list[str]:
        """One line for each value that is valid but above its plausible range."""
        lines = (f.metadata["valid"].warning(flag_of(f), getattr(self, f.name))
                 for f in dataclasses.fields(self) if f.metadata["valid"] is not None)
        return [line for line in lines if line]

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decay_epochs"] = list(self.decay_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        if "num_workers" in d:  # config.json of runs before the rename
            d["decode_threads"] = d.pop("num_workers")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def summary(self) -> list[str]:
        """The start-up config in a few lines, one per group of flags, as they are typed:
        only the fields that matter to this run's data set, schedule and optimizer (the
        speed switches have a line of their own). ``config.json`` keeps every field."""
        lines: dict[str, list[str]] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            group = f.metadata["group"]
            if group == "speed" or (value is None) or not _RELEVANT.get(f.name, _always)(self):
                continue
            lines.setdefault(group, []).append(f"{flag_of(f)} {as_typed(value)}")
        return [f"{group}: {' '.join(lines[group])}" for group in GROUPS if group in lines]

    def levers(self) -> dict[str, Any]:
        """The model's speed switches (``get_model``'s keywords): how, not what, it computes."""
        return dict(bn_impl=self.bn_impl, bn_split_rows=self.bn_split_rows,
                    pool_impl=self.pool_impl, stem_impl=self.stem_impl)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def recipe(self, decays_in_run: tuple[float, ...] | None = None) -> str:
        """The optimizer and schedule in words, for the start line. ``decays_in_run``: the
        decay epochs that fall inside the run (default: all of them)."""
        opt = ("LARS (trust coefficient " f"{self.trust_coefficient:g}) + " if
               self.optimizer == "lars" else "") + ("Nesterov " if self.nesterov else "") + \
            "momentum SGD"
        decays = self.decay_epochs if decays_in_run is None else tuple(decays_in_run)
        if self.schedule == "poly":
            sched = f"poly decay (power {self.poly_power:g}, end rate {self.end_lr:g})"
        elif decays:
            sched = (f"step decay ×{self.decay_factor:g} at epoch"
                     f"{'s' if len(decays) > 1 else ''} {', '.join(f'{e:g}' for e in decays)}")
        else:
            sched = "no decay"
        smooth = (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing
                  else "")
        return f"recipe: {opt}, {self.momentum_form}, {self.warmup} warmup, {sched}{smooth}"



def _always(config: TrainConfig) -> bool:
    return True


def _reads_images(config: TrainConfig) -> bool:
    """The image pipeline's fields matter to data sets read from image files."""
    return config.data not in ("synthetic", "fashion_mnist")


# When a field matters to a run (the start-up config shows it); every other field always
# does (when it has a value).
_RELEVANT = {
    "tfds_name": lambda c: c.data == "imagenet",
    "max_image_size": lambda c: c.image_size is not None,
    "decode_threads": _reads_images, "decode_workers": _reads_images,
    "resizer": _reads_images, "max_bad_fraction": _reads_images,
    "color_jitter": _reads_images, "lighting": _reads_images,
    "relist": lambda c: c.data == "folder" or (c.data == "imagenet" and c.data_dir is not None),
    "synthetic_examples": lambda c: c.data == "synthetic",
    "synthetic_eval_examples": lambda c: c.data == "synthetic",
    "decay_epochs": lambda c: c.schedule == "steps",
    "decay_factor": lambda c: c.schedule == "steps",
    "poly_power": lambda c: c.schedule == "poly",
    "end_lr": lambda c: c.schedule == "poly",
    "trust_coefficient": lambda c: c.optimizer == "lars",
    "momentum_correction": lambda c: c.momentum_form == "eq10",
    "warmup_epochs": lambda c: c.warmup != "none",
    "allreduce": lambda c: c.allreduce != "psum",
    "label_smoothing": lambda c: c.label_smoothing != 0,
    "keep_every_epochs": _always,
}


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


# Fields that may differ between a checkpoint and the run resuming from it: they
# change where the data is read from, how often the run logs, evaluates and saves,
# how long it runs, and how the same sum is computed, never the math of a step.
# Every other field is part of the recipe (shapes, the data and its order, the
# model, the schedule, the optimizer, augmentation): a resume that changes one is
# refused, so a run's records always describe one recipe. A field added later is
# part of the recipe unless it is listed here.
FREE_FIELDS = frozenset({
    "data_dir", "val_labels", "relist", "decode_threads", "max_bad_fraction",
    "synthetic_eval_examples",
    "eval_batch_size", "epochs", "num_steps", "allreduce", "checkpoint_every_steps",
    "keep_checkpoints", "keep_every_epochs", "eval_every_epochs", "median_evals",
    "log_every_steps", "init_from", "decode_workers", "max_image_size",
    # How the same step is computed (equal within float rounding, the same trees).
    "bn_impl", "bn_split_rows", "pool_impl", "stem_impl",
})


def resume_fields(saved: dict | None = None) -> tuple[str, ...]:
    """The fields that must match between a checkpoint whose config is ``saved`` and the
    run resuming from it. ``--epochs`` is free under the paper's step decay (its
    decays are at fixed epochs), but not under ``--schedule poly``, which decays
    towards the last epoch."""
    free = FREE_FIELDS - {"epochs"} if (saved or {}).get("schedule") == "poly" else FREE_FIELDS
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in free)


RESUME_FIELDS = resume_fields()


def _choice(name, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")
