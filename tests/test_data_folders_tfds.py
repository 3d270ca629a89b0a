"""A data set read from its folders gives the tfds path's batches, bit for bit.

The same generated images are written both ways: a tfds ArrayRecord set in the folders'
file order, and a folder data set. Same seed: the same train batches (threads, 2 decoding
workers, 2 processes' shards), the same evaluation batches, the same bad files.
"""

import numpy as np
import pytest
from helpers import assert_same_batches, global_batches

pytest.importorskip("tensorflow_datasets")
from tiny_imagenet import SORTED_BUILDER, build_sorted  # noqa: E402
from tiny_images import write_folder  # noqa: E402

from lsgd_jax.data import TrainIterator, eval_batches, get_source  # noqa: E402
from lsgd_jax.data.workers import WorkerTrainIterator  # noqa: E402

OPTIONS = {"image_size": 16, "eval_resize": 20, "max_bad_fraction": 0.1, "decode_threads": 2}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tfds_dir = build_sorted(tmp_path_factory.mktemp("tfds"))
    folder = write_folder(tmp_path_factory.mktemp("folder"))
    return tfds_dir, folder


def open_both(both, split="train"):
    tfds_dir, folder = both
    return (get_source("imagenet", split=split, data_dir=tfds_dir, builder_name=SORTED_BUILDER,
                       **OPTIONS),
            get_source("folder", split=split, data_dir=folder, **OPTIONS))


def test_train_batches_are_the_tfds_paths_in_process_with_workers_and_two_processes(both):
    tfds_src, folder_src = open_both(both)
    kw = dict(global_batch_size=8, seed=11)
    try:
        assert tfds_src.num_examples == folder_src.num_examples
        reference = global_batches([TrainIterator(tfds_src, **kw)], 12)  # 5 steps an epoch: 3 epochs
        assert_same_batches(global_batches([TrainIterator(folder_src, **kw)], 12), reference)
        assert folder_src.bad_examples.keys() == tfds_src.bad_examples.keys()
        for workers, processes in ((2, 1), (2, 2)):
            its = [WorkerTrainIterator(folder_src, decode_workers=workers, process_index=p,
                                       process_count=processes, **kw) for p in range(processes)]
            try:
                assert_same_batches(global_batches(its, 12), reference)
            finally:
                for it in its:
                    it.close()
        shards = [TrainIterator(folder_src, process_index=p, process_count=2, **kw)
                  for p in range(2)]
        assert_same_batches(global_batches(shards, 12), reference)
    finally:
        tfds_src.close()
        folder_src.close()


def test_evaluation_batches_are_the_tfds_paths(both):
    tfds_src, folder_src = open_both(both, "validation")
    try:
        for processes in (1, 2):
            a = [b for p in range(processes) for b in
                 eval_batches(tfds_src, global_batch_size=16, process_index=p,
                              process_count=processes)]
            b = [b for p in range(processes) for b in
                 eval_batches(folder_src, global_batch_size=16, process_index=p,
                              process_count=processes)]
            assert_same_batches(a, b)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x["mask"], y["mask"])
    finally:
        tfds_src.close()
        folder_src.close()


@pytest.mark.slow
def test_training_on_the_folder_with_workers_equals_training_on_tfds(both, tmp_path):
    """The trainer end to end: the same losses at every step, evaluation and final state,
    whether the images come from tfds (threads) or from the folder (decoding workers)."""
    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.loop import train_and_evaluate
    from lsgd_jax.training.metrics import read_metrics

    tfds_dir, folder = both
    common = dict(model="resnet20", image_size=16, batch_size=16, bn_group_size=2,
                  eval_batch_size=16, dtype="float32", epochs=2, warmup_epochs=0,
                  decay_epochs=(), max_bad_fraction=0.2, decode_threads=2, log_every_steps=1)
    configs = {"tfds": TrainConfig(data="imagenet", data_dir=tfds_dir, tfds_name=SORTED_BUILDER,
                                   decode_workers=0, **common),
               "folder": TrainConfig(data="folder", data_dir=folder, decode_workers=2, **common)}
    results = {}
    for name, config in configs.items():
        run = str(tmp_path / name)
        train_and_evaluate(config, run, log=lambda m: None)
        results[name] = ([r["loss"] for r in read_metrics(run, "train")],
                         [(r["top1_error"], r["loss"]) for r in read_metrics(run, "eval")],
                         read_metrics(run, "checkpoint")[-1]["state_sha256"])
    assert len(results["tfds"][0]) == 4 and results["tfds"][1]
    assert results["folder"] == results["tfds"]
