"""Remark 4: one permutation per epoch from (seed, epoch), divided among all processes."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsgd_jax.data.sampler import (
    Position,
    eval_indices,
    shard_indices,
    steps_per_epoch,
)


@st.composite
def layouts(draw):
    """(num_examples, global_batch_size, process_count) with a valid layout."""
    process_count = draw(st.sampled_from([1, 2, 3, 4, 8]))
    local = draw(st.integers(1, 6))
    global_batch = process_count * local
    num_examples = draw(st.integers(global_batch, 5 * global_batch + 7))
    return num_examples, global_batch, process_count


def all_shards(n, gb, pc, seed, epoch):
    return [
        shard_indices(n, global_batch_size=gb, seed=seed, epoch=epoch,
                      process_index=p, process_count=pc)
        for p in range(pc)
    ]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**32), st.integers(0, 100))
def test_each_example_at_most_once_and_remainder_dropped(layout, seed, epoch):
    n, gb, pc = layout
    shards = all_shards(n, gb, pc, seed, epoch)
    steps = n // gb
    for s in shards:
        assert s.shape == (steps, gb // pc)
    ids = np.concatenate([s.ravel() for s in shards])
    assert len(np.unique(ids)) == len(ids) == steps * gb
    assert ids.min() >= 0 and ids.max() < n


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**32), st.integers(0, 100))
def test_global_batches_do_not_depend_on_process_count(layout, seed, epoch):
    n, gb, pc = layout
    single = shard_indices(n, global_batch_size=gb, seed=seed, epoch=epoch,
                           process_index=0, process_count=1)
    assembled = np.concatenate(all_shards(n, gb, pc, seed, epoch), axis=1)
    np.testing.assert_array_equal(assembled, single)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32))
def test_process_share_changes_every_epoch(seed):
    # A fixed subset per process (what Remark 4 forbids) would give the same set.
    n, gb, pc = 40, 8, 2
    sets = [frozenset(all_shards(n, gb, pc, seed, e)[0].ravel().tolist()) for e in range(4)]
    assert len(set(sets)) == 4
    # And over a few epochs process 0 reads examples from both halves of the data.
    seen = set().union(*sets)
    assert min(seen) < n // 2 <= max(seen)


def test_dropped_remainder_differs_between_epochs():
    n, gb = 103, 10
    dropped = []
    for epoch in range(3):
        read = set(shard_indices(n, global_batch_size=gb, seed=7, epoch=epoch,
                                 process_index=0, process_count=1).ravel().tolist())
        dropped.append(frozenset(set(range(n)) - read))
    assert all(len(d) == 3 for d in dropped)
    assert len(set(dropped)) == 3


def test_deterministic_and_seed_dependent():
    kwargs = dict(global_batch_size=16, epoch=3, process_index=1, process_count=4)
    a = shard_indices(1000, seed=5, **kwargs)
    np.testing.assert_array_equal(a, shard_indices(1000, seed=5, **kwargs))
    assert not np.array_equal(a, shard_indices(1000, seed=6, **kwargs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(global_batch_size=10, process_count=3), ValueError, "divisible"),
        (dict(global_batch_size=200), ValueError, "larger than the data set"),
        (dict(global_batch_size=0), ValueError, "global_batch_size"),
        (dict(process_index=2, process_count=2), ValueError, "out of range"),
        (dict(process_index=-1), ValueError, "process_index"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(epoch=-2), ValueError, "epoch"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(global_batch_size=True), TypeError, "global_batch_size"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(global_batch_size=10, seed=0, epoch=0, process_index=0, process_count=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        shard_indices(100, **args)


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_eval_indices_cover_every_example_exactly_once(layout):
    n, gb, pc = layout
    parts = [eval_indices(n, global_batch_size=gb, process_index=p, process_count=pc)
             for p in range(pc)]
    num_batches = -(-n // gb)
    for ids, mask in parts:
        assert ids.shape == mask.shape == (num_batches, gb // pc)
    real = np.concatenate([ids[mask] for ids, mask in parts])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))


def test_position_round_trip_and_validation():
    p = Position(epoch=3, step=7)
    assert Position.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert Position.from_global_step(37, 10) == Position(epoch=3, step=7)
    assert p.global_step(10) == 37
    with pytest.raises(ValueError, match="epoch"):
        Position.from_dict({"epoch": 1})
    with pytest.raises(ValueError, match="step"):
        Position(epoch=0, step=-1)
    assert steps_per_epoch(1281167, 8192) == 156
