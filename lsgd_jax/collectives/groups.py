"""Device groups along one mesh axis, and the `ppermute` pairs between them.

Every algorithm in this package runs inside `shard_map` over a 1-D axis and
reduces over *groups* of positions on that axis: the whole axis (flat
all-reduce), the devices of one host, or the devices with the same local index
on every host (the two levels of the hierarchical variant, paper section 4).
All groups of one call have the same size, so every device runs the same
program (SPMD); a device finds its own role by looking its axis index up in a
small constant table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Groups = tuple[tuple[int, ...], ...]


def axis_size(axis_name: str) -> int:
    """Static number of devices along `axis_name` (works on old and new JAX)."""
    if hasattr(lax, "axis_size"):
        return int(lax.axis_size(axis_name))
    return int(lax.psum(1, axis_name))  # older JAX folds this to a constant


def whole_axis(p: int) -> Groups:
    return (tuple(range(p)),)


def host_groups(p: int, devices_per_host: int) -> tuple[Groups, Groups]:
    """(inside each host, across hosts) groups for `p` devices, host-major order.

    Devices 0..h-1 form host 0, h..2h-1 host 1, and so on, as
    `jax.devices()` orders them for multi-process runs.
    """
    h = devices_per_host
    if h < 1 or p % h:
        raise ValueError(
            f"devices_per_host={h} must be a positive divisor of the {p} devices "
            "on the axis; valid values: "
            f"{[d for d in range(1, p + 1) if p % d == 0]}"
        )
    hosts = p // h
    intra = tuple(tuple(range(g * h, (g + 1) * h)) for g in range(hosts))
    inter = tuple(tuple(g * h + i for g in range(hosts)) for i in range(h))
    return intra, inter


def lookup(axis_name: str, table: Sequence[int]) -> jax.Array:
    """`table[axis_index]` as a traced int32 (this device's role)."""
    return jnp.asarray(np.asarray(table, np.int32))[lax.axis_index(axis_name)]


def positions(groups: Groups, p: int) -> list[int]:
    """Table: axis index -> position inside its group."""
    table = [0] * p
    for group in groups:
        for i, device in enumerate(group):
            table[device] = i
    return table


def pairs(groups: Groups, step: Callable[[int], int | None]) -> list[tuple[int, int]]:
    """`ppermute` pairs sending from group position i to position step(i).

    The same relative pattern is applied in every group at once, so one
    `ppermute` carries one step of the algorithm for all groups.
    """
    out = []
    for group in groups:
        for i, device in enumerate(group):
            j = step(i)
            if j is not None:
                out.append((device, group[j]))
    return out


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pad a flat vector so it splits into `multiple` equal chunks."""
    extra = -x.shape[0] % multiple
    return jnp.pad(x, (0, extra)) if extra else x
