"""Train/eval streams: exact resume with 2 simulated processes, exactly-once eval, prefetch."""

import json
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsgd_jax.data import (
    Position,
    TrainIterator,
    eval_batches,
    get_source,
    num_eval_batches,
)
from lsgd_jax.parallel.prefetch import prefetch_to_mesh


class RecordingSource:
    """Each image carries (id, seed, epoch, train) so tests can see what was read."""

    num_classes = 5
    image_shape = (1, 1, 4)
    pixel_mean = (0.0,) * 4
    pixel_std = (1.0,) * 4

    def __init__(self, num_examples):
        self.num_examples = num_examples

    def get_batch(self, ids, *, seed, epoch, train):
        ids = np.asarray(ids)
        image = np.stack([ids, np.full_like(ids, seed), np.full_like(ids, epoch),
                          np.full_like(ids, int(train))], axis=-1)
        return {"image": image.reshape(len(ids), 1, 1, 4).astype(np.int64),
                "label": (ids % 5).astype(np.int32)}

    def close(self):
        pass


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def global_stream(source, *, process_count, steps, position=None, seed=11, gb=12):
    iters = [TrainIterator(source, global_batch_size=gb, seed=seed, process_index=p,
                           process_count=process_count, position=position)
             for p in range(process_count)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in iters]
        out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
    return out, iters


def assert_streams_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_epochs_cover_data_and_redraw_permutation():
    src = RecordingSource(50)  # 4 steps of 12 per epoch, 2 examples dropped
    it = TrainIterator(src, global_batch_size=12, seed=3)
    assert it.steps_per_epoch == 4
    batches = take(it, 8)
    assert it.position == Position(epoch=2, step=0)
    epochs = [np.concatenate([b["image"][:, 0, 0, 0] for b in batches[e * 4:(e + 1) * 4]])
              for e in range(2)]
    for e, ids in enumerate(epochs):
        assert len(set(ids.tolist())) == 48
        np.testing.assert_array_equal(
            np.concatenate(batches[e * 4]["image"][:, 0, 0, 2:3].T), np.full(12, e))
    assert not np.array_equal(epochs[0], epochs[1])


def test_two_processes_resume_mid_epoch_equals_uninterrupted(tmp_path):
    src = RecordingSource(50)
    reference, _ = global_stream(src, process_count=2, steps=11)
    # The global stream does not depend on the number of processes.
    single, _ = global_stream(src, process_count=1, steps=11)
    assert_streams_equal(reference, single)
    # Interrupt after 6 steps (mid epoch 1), save the position as a checkpoint would.
    first, iters = global_stream(src, process_count=2, steps=6)
    assert iters[0].position == iters[1].position == Position(epoch=1, step=2)
    (tmp_path / "pos.json").write_text(json.dumps(iters[0].position.to_dict()))
    saved = json.loads((tmp_path / "pos.json").read_text())
    rest, _ = global_stream(src, process_count=2, steps=5, position=saved)
    assert_streams_equal(first + rest, reference)


def test_resume_with_augmentation_on_fashion_mnist_files(tmp_path):
    from test_data_sources import write_idx

    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(30) % 10)
    src = get_source("fashion_mnist", split="train", data_dir=str(tmp_path))
    reference, _ = global_stream(src, process_count=2, steps=7, gb=8)
    first, iters = global_stream(src, process_count=2, steps=4, gb=8)
    rest, _ = global_stream(src, process_count=2, steps=3, gb=8, position=iters[1].position)
    assert_streams_equal(first + rest, reference)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=12, process_count=5), "divisible"),
        (dict(global_batch_size=64), "larger than the data set"),
        (dict(global_batch_size=12, process_index=2, process_count=2), "out of range"),
        (dict(global_batch_size=12, seed=-3), "seed"),
        (dict(global_batch_size=12, position={"epoch": 0, "step": 4}), "past the end"),
        (dict(global_batch_size=12, position={"epoch": 0}), "keys 'epoch' and 'step'"),
    ],
)
def test_bad_iterator_arguments(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        TrainIterator(RecordingSource(50), **kwargs)


@pytest.mark.parametrize("num_examples, gb, pc", [(50, 12, 2), (48, 12, 3), (7, 8, 4), (1, 4, 2)])
def test_eval_scores_every_example_once_with_equal_batch_counts(num_examples, gb, pc):
    src = RecordingSource(num_examples)
    streams = [list(eval_batches(src, global_batch_size=gb, process_index=p, process_count=pc))
               for p in range(pc)]
    assert {len(s) for s in streams} == {num_eval_batches(num_examples, gb)}
    ids = []
    for stream in streams:
        for b in stream:
            assert b["image"].shape[0] == b["mask"].shape[0] == gb // pc
            assert b["mask"].dtype == np.float32 and (b["image"][:, 0, 0, 3] == 0).all()
            ids += b["image"][b["mask"] == 1, 0, 0, 0].tolist()
    assert sorted(ids) == list(range(num_examples))


@pytest.fixture(scope="module")
def sharding():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def test_prefetch_builds_global_arrays_and_tracks_position(sharding):
    src = RecordingSource(50)
    expected = take(TrainIterator(src, global_batch_size=8, seed=2), 9)
    prefetcher = prefetch_to_mesh(TrainIterator(src, global_batch_size=8, seed=2), sharding, size=2)
    with prefetcher:
        assert prefetcher.position == Position(0, 0)
        for k in range(9):
            batch = next(prefetcher)
            assert isinstance(batch["image"], jax.Array)
            assert batch["image"].sharding == sharding and batch["label"].shape == (8,)
            np.testing.assert_array_equal(np.asarray(batch["image"]), expected[k]["image"])
            # The wrapped iterator runs ahead; the prefetcher reports the consumer's place.
            assert prefetcher.position == Position.from_global_step(k + 1, 6)
    assert not prefetcher._thread.is_alive()


def test_prefetch_propagates_producer_errors_and_ends(sharding):
    def failing():
        yield {"x": np.zeros(8, np.float32)}
        raise KeyError("decoder exploded")

    prefetcher = prefetch_to_mesh(failing(), sharding)
    next(prefetcher)
    with pytest.raises(KeyError, match="decoder exploded"):
        next(prefetcher)
    with pytest.raises(StopIteration):
        next(prefetcher)
    finite = prefetch_to_mesh(iter([{"x": np.ones(8, np.int32)}] * 3), sharding)
    assert len(list(finite)) == 3


def test_prefetch_close_stops_a_blocked_producer(sharding):
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield {"x": np.zeros(8, np.float32)}

    prefetcher = prefetch_to_mesh(endless(), sharding, size=1)
    next(prefetcher)
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    n = len(produced)
    threading.Event().wait(0.2)
    assert len(produced) == n  # nothing runs after close
    with pytest.raises(ValueError, match="prefetch size"):
        prefetch_to_mesh(endless(), sharding, size=0)
