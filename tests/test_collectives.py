"""The paper's all-reduce algorithms equal `lax.psum` on 2..8 fake devices.

Integers must match exactly (any misplaced chunk shows); floats are checked
against the exact sum of the inputs with the textbook bound for p - 1
roundings, |computed - exact| <= (p - 1) * u * sum_i |x_i|, where u is the
unit roundoff of the dtype (2^-24 for float32, 2^-8 for bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mesh_of
from jax.sharding import PartitionSpec as P

from lsgd_jax.collectives import ALLREDUCE_NAMES, get_allreduce, plan_buckets

try:
    shard_map = jax.shard_map
except AttributeError:  # older JAX
    from jax.experimental.shard_map import shard_map

UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(jnp.bfloat16): 2.0**-8}


def _per_device_tree(p, seed=0, bfloat16=False):
    """Leaves of odd sizes, tiny and large; leading axis = device."""
    rng = np.random.default_rng(seed)
    def normal(*shape):
        return rng.standard_normal((p, *shape))

    tree = {
        "conv": {"kernel": normal(3, 3, 5, 7).astype(np.float32)},  # 315
        "bn": {"bias": normal(7).astype(np.float32), "scale": normal().astype(np.float32)},
        "dense": normal(1001).astype(np.float32),
        "count": rng.integers(-1000, 1000, (p, 5)).astype(np.int32),
    }
    if bfloat16:
        tree["half"] = normal(17, 3).astype(jnp.bfloat16)
        tree["half_big"] = normal(513).astype(jnp.bfloat16)
    return tree


def _run(allreduce, tree, p):
    """(algorithm result, psum result), both per device, for a per-device tree."""

    def body(local):
        local = jax.tree.map(lambda x: x[0], local)
        both = (allreduce(local, "data"), jax.lax.psum(local, "data"))
        return jax.tree.map(lambda x: x[None], both)

    f = shard_map(body, mesh=mesh_of(p), in_specs=P("data"), out_specs=P("data"))
    return jax.jit(f)(tree)


def _check_sums(tree, got, ref):
    for x, g, r in zip(*(jax.tree.leaves(t) for t in (tree, got, ref))):
        x, g, r = np.asarray(x), np.asarray(g), np.asarray(r)
        assert g.dtype == x.dtype and g.shape == x.shape
        # Every device must hold the same bits: the engine returns the sum as
        # replicated (out_specs P()) without a check.
        assert all(np.array_equal(g[0], g[d]) for d in range(g.shape[0]))
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(g, r)  # tolerance: none, integer sums
            np.testing.assert_array_equal(g[0], x.sum(0))
            continue
        p = x.shape[0]
        exact = x.astype(np.float64).sum(0)
        # tolerance: (p - 1) roundings in the dtype, plus 1% slack for higher-order terms
        bound = 1.01 * (p - 1) * UNIT_ROUNDOFF[x.dtype] * np.abs(x.astype(np.float64)).sum(0)
        for device in range(p):
            assert np.all(np.abs(g[device].astype(np.float64) - exact) <= bound)
            assert np.all(np.abs(r[device].astype(np.float64) - exact) <= bound)


POWER_OF_TWO = (2, 4, 8)
CASES = (
    [(p, "ring") for p in range(2, 9)]
    + [(p, "halving_doubling") for p in POWER_OF_TWO]
    # For a power of two, binary blocks runs halving/doubling itself: p = 8 checks that.
    + [(p, "binary_blocks") for p in (3, 5, 6, 7, 8)]
    + [(p, "hierarchical") for p in (4, 6, 8)]  # 2, 3 and 4 hosts of 2 devices
)


@pytest.mark.parametrize("p,name", CASES)
def test_equals_psum(p, name):
    options = {"devices_per_host": 2} if name == "hierarchical" else {}
    # Default buckets: one per dtype (many buckets and bfloat16: below).
    allreduce = get_allreduce(name, **options)
    tree = _per_device_tree(p)
    got, ref = _run(allreduce, tree, p)
    _check_sums(tree, got, ref)


@pytest.mark.parametrize(
    "p,name", [(7, "binary_blocks"), (5, "ring"), (4, "halving_doubling"), (6, "hierarchical")]
)
def test_equals_psum_bfloat16_and_small_buckets(p, name):
    # 1 KiB buckets: the tiny BN leaves share a bucket, the kernel and the
    # dense leaf travel alone, the two bfloat16 leaves are split.
    options = {"devices_per_host": 2} if name == "hierarchical" else {}
    allreduce = get_allreduce(name, bucket_bytes=1024, **options)
    tree = _per_device_tree(p, seed=3, bfloat16=True)
    got, ref = _run(allreduce, tree, p)
    _check_sums(tree, got, ref)


@pytest.mark.parametrize(
    "p,devices_per_host,between",
    [(8, 4, "halving_doubling"), (6, 2, "binary_blocks"), (6, 3, "ring")],
)
def test_hierarchical_fake_hosts(p, devices_per_host, between):
    allreduce = get_allreduce(
        "hierarchical", devices_per_host=devices_per_host, between_hosts=between
    )
    tree = _per_device_tree(p, seed=1)
    got, ref = _run(allreduce, tree, p)
    _check_sums(tree, got, ref)


@pytest.mark.parametrize("n", [1, 9])
def test_sizes_below_and_around_device_count(n):
    """Vectors shorter than p and not divisible by p are padded and unpadded."""
    p = 7
    x = np.random.default_rng(n).integers(-50, 50, (p, n)).astype(np.int32)
    for name in ("ring", "binary_blocks"):
        got, _ = _run(get_allreduce(name), x, p)
        np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(x.sum(0), (p, n)))


def test_default_devices_per_host_is_local_device_count():
    # 8 local devices: one "host", so hierarchical is a ring inside it.
    tree = _per_device_tree(8, seed=2)
    got, ref = _run(get_allreduce("hierarchical"), tree, 8)
    _check_sums(tree, got, ref)
    with pytest.raises(ValueError, match="devices_per_host=8"):
        _run(get_allreduce("hierarchical"), _per_device_tree(6), 6)


def _ppermutes(jaxpr):
    """Every ppermute equation in a (nested) jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found.extend(_ppermutes(inner))
    return found


def _traced_ppermutes(allreduce, p, n, leaves=1):
    tree = [np.zeros((p, n), np.float32) for _ in range(leaves)]
    def body(t):
        return jax.tree.map(lambda x: x[None], allreduce(jax.tree.map(lambda x: x[0], t), "data"))

    f = shard_map(body, mesh=mesh_of(p), in_specs=P("data"), out_specs=P("data"))
    return _ppermutes(jax.make_jaxpr(f)(tree).jaxpr)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_steps_and_bytes_match_the_paper(p):
    """Section 4: ring takes 2(p-1) steps, halving/doubling 2 log2(p); both send
    2(p-1)/p * n elements per device."""
    n = 24 * p
    for name, steps in (("ring", 2 * (p - 1)), ("halving_doubling", 2 * int(np.log2(p)))):
        eqns = _traced_ppermutes(get_allreduce(name), p, n)
        assert len(eqns) == steps, name
        sent = sum(e.invars[0].aval.size for e in eqns)
        assert sent == 2 * (p - 1) * n // p, name


def test_buckets_merge_small_tensors_into_fewer_messages():
    p, leaves = 4, 10
    packed = _traced_ppermutes(get_allreduce("ring"), p, 3, leaves)
    separate = _traced_ppermutes(get_allreduce("ring", bucket_bytes=1), p, 3, leaves)
    assert len(packed) == 2 * (p - 1)
    assert len(separate) == leaves * 2 * (p - 1)


def test_plan_buckets_keeps_order_dtype_and_limit():
    sizes = [4, 4, 100, 8, 4, 2, 2, 64, 4]
    dtypes = ["f", "f", "f", "h", "f", "h", "h", "f", "f"]
    plan = plan_buckets(sizes, dtypes, bucket_bytes=16)
    assert sorted(i for b in plan for i in b) == list(range(len(sizes)))
    for bucket in plan:
        assert bucket == sorted(bucket)
        assert len({dtypes[i] for i in bucket}) == 1
        assert len(bucket) == 1 or sum(sizes[i] for i in bucket) <= 16
    assert [2] in plan and [7] in plan  # larger than a bucket: alone


def test_bad_names_and_options_fail_fast():
    with pytest.raises(ValueError, match="valid.*psum.*ring.*halving_doubling"):
        get_allreduce("tree")
    with pytest.raises(ValueError, match="devices_per_host=4 only applies"):
        get_allreduce("ring", devices_per_host=4)
    with pytest.raises(ValueError, match="between_hosts='tree'"):
        get_allreduce("hierarchical", between_hosts="tree")
    with pytest.raises(ValueError, match="positive int"):
        get_allreduce("hierarchical", devices_per_host=0)
    with pytest.raises(ValueError, match="devices_per_host=4 must be a positive divisor"):
        _run(get_allreduce("hierarchical", devices_per_host=4), _per_device_tree(6), 6)
    with pytest.raises(ValueError, match="binary_blocks"):
        _run(get_allreduce("halving_doubling"), _per_device_tree(6), 6)
    assert set(ALLREDUCE_NAMES) >= {"psum", "ring", "halving_doubling", "binary_blocks", "hierarchical"}
