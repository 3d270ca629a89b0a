"""The paper's gradient all-reduce algorithms (section 4), selectable by name.

`get_allreduce(name)` returns `fn(grads, axis_name) -> summed grads` for use
inside `shard_map` over a 1-D mesh axis; every device gets the sum of all
devices' pytrees, as with `lax.psum`:

* "psum": XLA's own all-reduce (NCCL on GPUs): the production choice;
* "ring": bucket (ring) reduce-scatter + all-gather, 2(p-1) steps;
* "halving_doubling": recursive halving/doubling, 2 log2(p) steps (p a power
  of two);
* "binary_blocks": halving/doubling for any p (power-of-two blocks);
* "hierarchical": reduce inside each host, all-reduce between hosts
  (binary blocks by default), broadcast inside the host.

The custom algorithms are written with `lax.ppermute` so that they can be
read, tested and compared; `lsgd_jax.collectives.costmodel` predicts their time.

Inputs must be the per-device values (e.g. gradients of each worker's own
loss); passing values that are already summed sums them again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
from jax import lax

from lsgd_jax.collectives.algorithms import (
    binary_block_sizes,
    binary_blocks,
    halving_doubling,
    ring,
)
from lsgd_jax.collectives.buckets import DEFAULT_BUCKET_BYTES, bucketed, plan_buckets
from lsgd_jax.collectives.groups import axis_size, whole_axis
from lsgd_jax.collectives.hierarchical import hierarchical

AllReduce = Callable[[object, str], object]

_FLAT = {
    "ring": ring,
    "halving_doubling": halving_doubling,
    "binary_blocks": binary_blocks,
}
ALLREDUCE_NAMES = ("psum", *_FLAT, "hierarchical")


def get_allreduce(
    name: str,
    *,
    devices_per_host: int | None = None,
    between_hosts: str = "binary_blocks",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> AllReduce:
    """All-reduce (sum) of a gradient pytree over one `shard_map` axis.

    Args:
      name: one of `ALLREDUCE_NAMES`.
      devices_per_host: "hierarchical" only: devices per host, the inner
        level; defaults to `jax.local_device_count()`.
      between_hosts: "hierarchical" only: the algorithm between hosts
        ("ring", "halving_doubling" or "binary_blocks").
      bucket_bytes: tensors smaller than this are packed together into
        buckets of about this size (custom algorithms only).

    Returns:
      `fn(tree, axis_name)`, to be called inside `shard_map`; returns a pytree
      of the same structure and dtypes holding the sum over the axis.

    Raises:
      ValueError: for an unknown name or an invalid option, at once; for a
        device count the algorithm cannot handle, when `fn` is traced.
    """
    if name not in ALLREDUCE_NAMES:
        raise ValueError(f"unknown all-reduce {name!r}; valid: {list(ALLREDUCE_NAMES)}")
    if devices_per_host is not None and name != "hierarchical":
        raise ValueError(
            f"devices_per_host={devices_per_host} only applies to 'hierarchical', "
            f"not {name!r}"
        )
    if between_hosts not in _FLAT:
        raise ValueError(
            f"between_hosts={between_hosts!r} is not valid; valid: {list(_FLAT)}"
        )
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive int")
    if name == "psum":
        return lambda tree, axis_name: lax.psum(tree, axis_name)
    if name == "hierarchical":
        if devices_per_host is None:
            devices_per_host = jax.local_device_count()
        if not isinstance(devices_per_host, int) or devices_per_host < 1:
            raise ValueError(
                f"devices_per_host={devices_per_host!r} must be a positive int"
            )
        flat = partial(
            hierarchical,
            devices_per_host=devices_per_host,
            between_hosts=_FLAT[between_hosts],
        )
    else:
        flat = _FLAT[name]

    def allreduce(tree, axis_name: str):
        groups = whole_axis(axis_size(axis_name))
        return bucketed(tree, lambda x: flat(x, axis_name, groups), bucket_bytes)

    return allreduce


__all__ = [
    "ALLREDUCE_NAMES",
    "DEFAULT_BUCKET_BYTES",
    "binary_block_sizes",
    "binary_blocks",
    "bucketed",
    "get_allreduce",
    "halving_doubling",
    "hierarchical",
    "plan_buckets",
    "ring",
]
