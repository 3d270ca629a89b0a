"""Two-level all-reduce: inside each host, then between hosts (paper section 4).

The paper aggregates in three phases: (1) the GPUs of a server are summed
into one buffer, (2) the servers all-reduce those buffers, (3) the result is
broadcast back to the server's GPUs. Here phase 1 is a ring reduce-scatter
inside the host, so each of its h devices holds 1/h of the host's sum; phase
2 runs h independent all-reduces between hosts (device i of every host
together), each on b/h elements; phase 3 is the inverse ring all-gather
inside the host. The result is the paper's, and the inter-host links carry
the b/h slices in parallel instead of one device carrying all b.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from lsgd_jax.collectives.algorithms import ring_all_gather, ring_reduce_scatter
from lsgd_jax.collectives.groups import Groups, axis_size, host_groups, pad_to_multiple

FlatAllReduce = Callable[[jax.Array, str, Groups], jax.Array]


def hierarchical(
    x: jax.Array,
    axis_name: str,
    groups: Groups,
    *,
    devices_per_host: int,
    between_hosts: FlatAllReduce,
) -> jax.Array:
    """Reduce inside each host, all-reduce between hosts, broadcast inside.

    `groups` must be the whole axis (one group): hosts are the consecutive
    runs of `devices_per_host` devices along it.
    """
    if len(groups) != 1:
        raise ValueError("hierarchical all-reduce spans the whole axis (one group)")
    p = axis_size(axis_name)
    intra, inter = host_groups(p, devices_per_host)
    n = x.shape[0]
    padded = pad_to_multiple(x, devices_per_host)
    # Device i of every host holds the same chunk index after the reduce-scatter,
    # so the h inter-host groups each reduce one slice.
    mine = ring_reduce_scatter(padded, axis_name, intra)
    if len(inter[0]) > 1:
        mine = between_hosts(mine, axis_name, inter)
    return ring_all_gather(mine, axis_name, intra)[:n]
