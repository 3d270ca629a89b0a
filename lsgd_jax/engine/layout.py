"""How a global minibatch kn is laid out, and the checks made before compiling.

kn images per step = devices × K microbatches × (microbatch / n) BN groups of
n images; each group is one of the paper's workers (Goyal et al. 2017,
section 3: BN statistics per worker of n images; footnote 5: accumulation).
Every check here is plain Python on shapes and configuration values, so every
process raises the same error before anything is compiled.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import lsgd_jax.base.checks as checks


class BatchLayout(NamedTuple):
    """How a global minibatch kn is laid out (see :func:`validate_batch_layout`)."""

    global_batch_size: int  # kn
    num_devices: int
    grad_accum_steps: int  # K
    bn_group_size: int  # n
    per_device: int  # kn / devices
    microbatch: int  # kn / (devices · K), images per device per forward pass
    num_bn_workers: int  # k = kn / n


# How an error names each value: the Python argument, or the command line's flag.
_ARGUMENTS = {"global_batch_size": "global_batch_size={}", "grad_accum_steps":
              "grad_accum_steps={}", "bn_group_size": "bn_group_size={}"}
_FLAGS = {"global_batch_size": "--batch-size {}", "grad_accum_steps": "--grad-accum-steps {}",
          "bn_group_size": "--bn-group-size {}"}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else ("es" if noun.endswith("s") else "s"))


def validate_batch_layout(
    *, global_batch_size: int, num_devices: int, grad_accum_steps: int, bn_group_size: int,
    num_processes: int = 1, flags: bool = False,
) -> BatchLayout:
    """Check that kn splits into devices × K microbatches × BN groups of n, and over the
    processes; the one check of a batch layout (``make_plan`` and ``make_train_step`` both
    call it).

    Pure Python on the configuration only, so every process raises the same
    error before anything is compiled.

    Args:
      flags: name the command line's flags in errors (``--batch-size 100``) rather than
        the arguments (``global_batch_size=100``).

    Raises:
      ValueError: naming the offending values and what would be valid.
    """
    for name, value in (("num_devices", num_devices), ("num_processes", num_processes)):
        checks.integer(name, value)
    words = _FLAGS if flags else _ARGUMENTS
    for name, value in (("global_batch_size", global_batch_size),
                        ("grad_accum_steps", grad_accum_steps), ("bn_group_size", bn_group_size)):
        checks.integer(words[name].format("").strip(" ="), value)
    kn, K, n = global_batch_size, grad_accum_steps, bn_group_size
    batch, accum, group = (words[k].format(v) for k, v in (
        ("global_batch_size", kn), ("grad_accum_steps", K), ("bn_group_size", n)))
    split = num_devices * K
    if kn % split:
        raise ValueError(
            f"{batch} does not split over {_count(num_devices, 'device')} × {accum}; use a "
            f"multiple of {split * n} ({split} × {group})")
    micro = kn // split
    per_device = (f"the microbatch of {micro} images per device ({batch} / "
                  f"{_count(num_devices, 'device')} / {accum})")
    if n > micro:
        raise ValueError(f"{group} is larger than {per_device}; use a group size of at most "
                         f"{micro}, or a batch size that is a multiple of {split * n}")
    if micro % n:
        raise ValueError(f"{group} does not divide {per_device}; use a group size that "
                         f"divides {micro}, or a batch size that is a multiple of {split * n}")
    if kn % num_processes:
        raise ValueError(f"{batch} does not split over the {_count(num_processes, 'process')}; "
                         f"use a multiple of {num_processes * n}")
    return BatchLayout(
        global_batch_size=kn,
        num_devices=num_devices,
        grad_accum_steps=K,
        bn_group_size=n,
        per_device=kn // num_devices,
        microbatch=micro,
        num_bn_workers=kn // n,
    )


def check_pixel_stats(pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
    """Per-channel normalization statistics: one mean and one positive std per channel."""
    if len(pixel_mean) != len(pixel_std):
        raise ValueError(
            f"pixel_mean {tuple(pixel_mean)} and pixel_std {tuple(pixel_std)} must have one "
            "value per channel each"
        )
    if any(not s > 0 for s in pixel_std):
        raise ValueError(f"pixel_std values must be > 0, got {tuple(pixel_std)}")


def check_batch(
    batch: Any, keys: Sequence[str], num_devices: int, global_batch_size: int | None, what: str
) -> None:
    """A batch has ``keys``, ``global_batch_size`` examples (if given) and splits over the
    devices."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{what}: batch lacks {missing}; it needs keys {list(keys)}")
    n = batch[keys[0]].shape[0]
    if global_batch_size is not None and n != global_batch_size:
        raise ValueError(
            f"{what}: batch['{keys[0]}'] has {n} examples, but the step was built for "
            f"global_batch_size={global_batch_size}"
        )
    if n % num_devices:
        raise ValueError(
            f"{what}: a batch of {n} examples cannot be split over {num_devices} devices; "
            f"pad it to a multiple of {num_devices} (with mask 0)"
        )
    for k in keys[1:]:
        if batch[k].shape[:1] != (n,):
            raise ValueError(
                f"{what}: batch['{k}'] has shape {batch[k].shape}, expected leading size {n}"
            )
