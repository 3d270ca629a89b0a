"""How a global minibatch kn is laid out, and the checks made before compiling.

kn images per step = devices × K microbatches × (microbatch / n) BN groups of
n images; each group is one of the paper's workers (Goyal et al. 2017,
section 3: BN statistics per worker of n images; footnote 5: accumulation).
Every check here is plain Python on shapes and configuration values, so every
process raises the same error before anything is compiled.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence


class BatchLayout(NamedTuple):
    """How a global minibatch kn is laid out (see :func:`validate_batch_layout`)."""

    global_batch_size: int  # kn
    num_devices: int
    grad_accum_steps: int  # K
    bn_group_size: int  # n
    per_device: int  # kn / devices
    microbatch: int  # kn / (devices · K), images per device per forward pass
    num_bn_workers: int  # k = kn / n


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_batch_layout(
    *, global_batch_size: int, num_devices: int, grad_accum_steps: int, bn_group_size: int
) -> BatchLayout:
    """Check that kn splits into devices × K microbatches × BN groups of n.

    Pure Python on the configuration only, so every process raises the same
    error before anything is compiled.

    Raises:
      ValueError: naming the offending values and what would be valid.
    """
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("num_devices", num_devices),
        ("grad_accum_steps", grad_accum_steps),
        ("bn_group_size", bn_group_size),
    ):
        _check_int(name, value)
    split = num_devices * grad_accum_steps
    if global_batch_size % split:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by num_devices "
            f"({num_devices}) x grad_accum_steps ({grad_accum_steps}) = {split}; "
            f"use a multiple of {split * bn_group_size}"
        )
    micro = global_batch_size // split
    if bn_group_size > micro:
        raise ValueError(
            f"bn_group_size={bn_group_size} is larger than the microbatch of {micro} images "
            f"per device (global_batch_size {global_batch_size} / {num_devices} devices / "
            f"{grad_accum_steps} accumulation steps); use bn_group_size <= {micro} or a "
            f"global batch of at least {split * bn_group_size}"
        )
    if micro % bn_group_size:
        raise ValueError(
            f"bn_group_size={bn_group_size} does not divide the microbatch of {micro} images "
            f"per device (global_batch_size {global_batch_size} / {num_devices} devices / "
            f"{grad_accum_steps} accumulation steps); valid group sizes divide {micro}"
        )
    return BatchLayout(
        global_batch_size=global_batch_size,
        num_devices=num_devices,
        grad_accum_steps=grad_accum_steps,
        bn_group_size=bn_group_size,
        per_device=global_batch_size // num_devices,
        microbatch=micro,
        num_bn_workers=global_batch_size // bn_group_size,
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
