"""The paper's all-reduce algorithms on one flat vector, written with `ppermute`.

Section 4 ("Communication") of Goyal et al. (2017) sums gradients between
servers with two algorithms, both "reduce-scatter then all-gather" and both
moving 2(p-1)/p * b bytes per link for a buffer of b bytes:

* bucket (ring) all-reduce: 2(p-1) steps, each passing one of p chunks to the
  next neighbour on a ring;
* recursive halving and doubling (Rabenseifner): 2 log2(p) steps, exchanging
  halves, quarters, ... of the buffer with partners at distance p/2, p/4, ...
  (reduce-scatter), then the same steps in reverse order (all-gather);

and, for a number of workers that is not a power of two, the binary blocks
algorithm (Rabenseifner and Traeff, 2004; Gloo's halving/doubling):
p = 2^a + 2^b + ... is split into power-of-two blocks, each block
reduce-scatters with halving, the partial sums flow from the smallest block to
the largest and the totals flow back, then each block all-gathers with
doubling.

Every function here runs inside `shard_map` and takes this device's flat
vector, the axis name and the groups to reduce over (see `groups.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lsgd_jax.collectives.groups import (
    Groups,
    axis_size,
    lookup,
    pad_to_multiple,
    pairs,
    positions,
)

# --- ring (bucket) algorithm ---------------------------------------------------


def ring_reduce_scatter(x: jax.Array, axis_name: str, groups: Groups) -> jax.Array:
    """p-1 ring steps; returns chunk (position + 1) mod q of the group's sum.

    `x` is a flat vector whose length divides by the group size q. Each
    device first rotates its chunks so that its own schedule uses static
    indices: chunk j of the rotated list is chunk (position + j) mod q.
    """
    q = len(groups[0])
    if q == 1:
        return x
    pos = lookup(axis_name, positions(groups, axis_size(axis_name)))
    chunks = list(jnp.roll(x.reshape(q, -1), -pos, axis=0))
    to_next = pairs(groups, lambda i: (i + 1) % q)
    for s in range(q - 1):
        # The left neighbour sends its rotated chunk -s, which is my chunk -s-1.
        received = lax.ppermute(chunks[-s % q], axis_name, to_next)
        chunks[(-s - 1) % q] = chunks[(-s - 1) % q] + received
    return chunks[1]


def ring_all_gather(chunk: jax.Array, axis_name: str, groups: Groups) -> jax.Array:
    """Inverse of `ring_reduce_scatter`: p-1 ring steps back to the full vector."""
    q = len(groups[0])
    if q == 1:
        return chunk
    pos = lookup(axis_name, positions(groups, axis_size(axis_name)))
    chunks = [jnp.zeros_like(chunk)] * q  # every slot but 1 is written below
    chunks[1] = chunk
    to_next = pairs(groups, lambda i: (i + 1) % q)
    for s in range(q - 1):
        chunks[-s % q] = lax.ppermute(chunks[(1 - s) % q], axis_name, to_next)
    return jnp.roll(jnp.concatenate(chunks), pos * chunk.shape[0])


def ring(x: jax.Array, axis_name: str, groups: Groups) -> jax.Array:
    """Bucket (ring) all-reduce of a flat vector: 2(p-1) steps of b/p elements."""
    q = len(groups[0])
    n = x.shape[0]
    padded = pad_to_multiple(x, q)
    return ring_all_gather(
        ring_reduce_scatter(padded, axis_name, groups), axis_name, groups
    )[:n]


# --- recursive halving and doubling --------------------------------------------


def _check_power_of_two(q: int, name: str) -> None:
    if q & (q - 1):
        raise ValueError(
            f"{name} needs a power-of-two number of devices per group, got {q}; "
            "use 'binary_blocks' (same algorithm, any count) or 'ring'"
        )


def halving_reduce_scatter(
    x: jax.Array, axis_name: str, groups: Groups, pos: jax.Array | None = None
) -> jax.Array:
    """log2(q) halving steps; returns chunk `position` of the group's sum.

    Step with distance d exchanges half of the current segment with the
    partner whose position differs in bit d; the device whose bit is 0 keeps
    the lower half. Going from d = q/2 down to 1 leaves device `position`
    with chunk number `position`.
    """
    q = len(groups[0])
    _check_power_of_two(q, "recursive halving/doubling")
    if pos is None:
        pos = lookup(axis_name, positions(groups, axis_size(axis_name)))
    d = q // 2
    while d >= 1:
        half = x.shape[0] // 2
        lower, upper = x[:half], x[half:]
        keep_lower = (pos // d) % 2 == 0
        send = jnp.where(keep_lower, upper, lower)
        keep = jnp.where(keep_lower, lower, upper)
        x = keep + lax.ppermute(send, axis_name, pairs(groups, lambda i, d=d: i ^ d))
        d //= 2
    return x


def doubling_all_gather(
    chunk: jax.Array, axis_name: str, groups: Groups, pos: jax.Array | None = None
) -> jax.Array:
    """Inverse of `halving_reduce_scatter`: log2(q) doubling steps, d = 1, 2, ..."""
    q = len(groups[0])
    _check_power_of_two(q, "recursive halving/doubling")
    if pos is None:
        pos = lookup(axis_name, positions(groups, axis_size(axis_name)))
    d = 1
    while d < q:
        other = lax.ppermute(chunk, axis_name, pairs(groups, lambda i, d=d: i ^ d))
        is_lower = (pos // d) % 2 == 0
        chunk = jnp.where(
            is_lower,
            jnp.concatenate([chunk, other]),
            jnp.concatenate([other, chunk]),
        )
        d *= 2
    return chunk


def halving_doubling(x: jax.Array, axis_name: str, groups: Groups) -> jax.Array:
    """Recursive halving/doubling all-reduce: 2 log2(p) steps (p a power of two)."""
    q = len(groups[0])
    _check_power_of_two(q, "recursive halving/doubling")
    n = x.shape[0]
    padded = pad_to_multiple(x, q)
    chunk = halving_reduce_scatter(padded, axis_name, groups)
    return doubling_all_gather(chunk, axis_name, groups)[:n]


# --- binary blocks (any number of devices) -------------------------------------


def binary_block_sizes(q: int) -> list[int]:
    """Powers of two summing to q, largest first (its binary digits)."""
    return [1 << b for b in reversed(range(q.bit_length())) if q >> b & 1]


def binary_blocks(x: jax.Array, axis_name: str, groups: Groups) -> jax.Array:
    """Binary blocks all-reduce: halving/doubling generalised to any p.

    For p = 7 = 4 + 2 + 1, positions 0-3, 4-5 and 6 form three blocks.
    1. Each block reduce-scatters with recursive halving.
    2. Up the chain, smallest block to largest: member j of a block of size B
       sends sub-chunk t of its chunk to member j * (B'/B) + t of the next
       block (size B'), which adds it; the largest block ends with the sum.
    3. Down the chain: each block collects its chunks of the sum from the next
       larger block.
    4. Each block all-gathers with recursive doubling.
    For a power of two there is one block and this is `halving_doubling`.
    """
    q = len(groups[0])
    sizes = binary_block_sizes(q)
    if len(sizes) == 1:
        return halving_doubling(x, axis_name, groups)
    p = axis_size(axis_name)
    n = x.shape[0]
    x = pad_to_multiple(x, sizes[0])  # every block size divides the largest

    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    block_groups = [
        tuple(g[s : s + size] for g in groups) for s, size in zip(starts, sizes)
    ]
    block_of = [0] * p
    for k, bg in enumerate(block_groups):
        for g in bg:
            for device in g:
                block_of[device] = k
    my_block = lookup(axis_name, block_of)

    # Every device traces every block's schedule (SPMD); only the block it
    # belongs to is kept, and `ppermute` moves data between members only.
    partial = [
        halving_reduce_scatter(x, axis_name, bg) if size > 1 else x
        for bg, size in zip(block_groups, sizes)
    ]

    def link(small: int, large: int, t: int, up: bool) -> list[tuple[int, int]]:
        ratio = sizes[large] // sizes[small]
        out = []
        for gs, gl in zip(block_groups[small], block_groups[large]):
            for j, device in enumerate(gs):
                pair = (device, gl[j * ratio + t])
                out.append(pair if up else pair[::-1])
        return out

    for small in reversed(range(1, len(sizes))):  # up: smallest block first
        large = small - 1
        m = partial[large].shape[0]
        for t in range(sizes[large] // sizes[small]):
            piece = partial[small][t * m : (t + 1) * m]
            # Members of `large` not addressed by sub-chunk t receive zeros.
            partial[large] = partial[large] + lax.ppermute(
                piece, axis_name, link(small, large, t, up=True)
            )
    for small in range(1, len(sizes)):  # down: largest block first
        large = small - 1
        pieces = [
            lax.ppermute(partial[large], axis_name, link(small, large, t, up=False))
            for t in range(sizes[large] // sizes[small])
        ]
        partial[small] = jnp.concatenate(pieces)

    result = None
    for k, (bg, size) in enumerate(zip(block_groups, sizes)):
        full = doubling_all_gather(partial[k], axis_name, bg) if size > 1 else partial[k]
        result = full if result is None else jnp.where(my_block == k, full, result)
    return result[:n]
