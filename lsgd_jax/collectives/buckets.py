"""Gradient pytrees to flat buckets and back.

A ResNet-50 has 161 parameter tensors, 106 of them BatchNorm scales
and biases of 64 to 2,048 elements. Each all-reduce step costs a latency
alpha whatever its size, so small tensors are packed into shared buckets
(one message per step instead of one per tensor) while large ones travel
alone. Tensors are grouped by dtype so that no value is converted.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

FlatFn = Callable[[jax.Array], jax.Array]

DEFAULT_BUCKET_BYTES = 4 * 2**20


def plan_buckets(
    sizes_bytes: list[int], dtypes: list, bucket_bytes: int
) -> list[list[int]]:
    """Greedy, order-preserving packing of leaf indices into buckets.

    Leaves of one dtype fill a bucket until adding the next would pass
    `bucket_bytes`; a leaf larger than that forms a bucket of its own.
    """
    open_bucket: dict = {}  # dtype -> (indices, bytes) of the bucket being filled
    buckets: list[list[int]] = []
    for i, (size, dtype) in enumerate(zip(sizes_bytes, dtypes)):
        indices, total = open_bucket.get(dtype, ([], 0))
        if indices and total + size > bucket_bytes:
            buckets.append(indices)
            indices, total = [], 0
        open_bucket[dtype] = (indices + [i], total + size)
    buckets.extend(indices for indices, _ in open_bucket.values())
    return sorted(buckets, key=lambda b: b[0])


def bucketed(tree, flat_fn: FlatFn, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """Apply `flat_fn` (flat vector -> flat vector) to `tree` bucket by bucket."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    plan = plan_buckets(
        [leaf.size * leaf.dtype.itemsize for leaf in leaves],
        [leaf.dtype for leaf in leaves],
        bucket_bytes,
    )
    out = list(leaves)
    for bucket in plan:
        flat = jnp.concatenate([leaves[i].reshape(-1) for i in bucket])
        if flat.shape[0] == 0:
            continue
        reduced = flat_fn(flat)
        offset = 0
        for i in bucket:
            size = leaves[i].size
            out[i] = reduced[offset : offset + size].reshape(leaves[i].shape)
            offset += size
    return jax.tree_util.tree_unflatten(treedef, out)
