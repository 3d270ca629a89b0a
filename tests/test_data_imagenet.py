"""The tfds ImageNet reader on a real ArrayRecord data set built from generated files.

The data set has the features of ``imagenet2012`` (image, label, file_name) and holds
raw encoded bytes: ordinary JPEGs, a CMYK JPEG, PNG data under a .JPEG name, a grayscale
JPEG, a corrupt file and a truncated JPEG. Each example is a flat color that encodes its
number, so a decoded crop tells which example it came from.
"""

import logging
import os
import re

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
from tiny_imagenet import (  # noqa: E402
    BUILDER,
    CORRUPT,
    NUM,
    TRUNCATED,
    color,
    damaged_copy,
    unreadable_ids,
)

from lsgd_jax.data import Position, TrainIterator, eval_batches, get_source  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tiny_tfds):
    return tiny_tfds


def open_source(data_dir, split="train", **kwargs):
    kwargs = {"builder_name": BUILDER, "image_size": 16, "eval_resize": 20,
              "max_bad_fraction": 0.1, "decode_threads": 2, **kwargs}
    return get_source("imagenet", split=split, data_dir=data_dir, **kwargs)


def example_of(image):
    """The example whose color the center of a decoded image has (-1 if none)."""
    center = image[4:12, 4:12].reshape(-1, 3).mean(0)
    dist = [np.abs(center - np.array(color(i))).max() for i in range(NUM)]
    best = int(np.argmin(dist))
    return best if dist[best] < 8 else -1  # tolerance: JPEG/CMYK round trip of a flat color


def file_numbers(src, ids):
    return [int(src._records[int(j)]["file_name"].decode().split("_")[1].split(".")[0])
            for j in ids]


def test_reader_metadata_and_decoded_content(data_dir):
    with open_source(data_dir, split="validation") as src:
        assert (src.num_examples, src.num_classes, src.image_shape) == (NUM, 4, (16, 16, 3))
        assert src.pixel_mean == (123.675, 116.28, 103.53)
        ids = np.arange(NUM)
        batch = src.get_batch(ids, seed=0, epoch=0, train=False)
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        numbers = file_numbers(src, ids)
        for k, n in enumerate(numbers):
            if n in (CORRUPT, TRUNCATED):
                continue
            # CMYK, PNG-under-.JPEG and grayscale examples decode to their own RGB color.
            assert example_of(batch["image"][k]) == n
            assert batch["label"][k] == n % 4


def test_bad_files_are_skipped_counted_logged_and_replaced(data_dir, caplog):
    with open_source(data_dir) as src:
        numbers = file_numbers(src, range(NUM))
        bad_ids = sorted(numbers.index(n) for n in (CORRUPT, TRUNCATED))
        with caplog.at_level(logging.WARNING, logger="lsgd_jax.data.imagenet"):
            batch = src.get_batch(np.array(bad_ids), seed=1, epoch=2, train=True)
        assert batch["image"].shape == (2, 16, 16, 3)
        assert sorted(src.bad_examples) == bad_ids
        assert {f"n0000_{CORRUPT}.JPEG", f"n0000_{TRUNCATED}.JPEG"} == set(src.bad_examples.values())
        assert all(f"id={i}" in caplog.text for i in bad_ids)
        # Replaced by the next decodable id, with that example's label.
        for k, i in enumerate(bad_ids):
            j = (i + 1) % NUM
            while j in bad_ids:
                j = (j + 1) % NUM
            assert example_of(batch["image"][k]) == numbers[j]
            assert batch["label"][k] == numbers[j] % 4
        # Deterministic: the same call gives the same batch.
        again = src.get_batch(np.array(bad_ids), seed=1, epoch=2, train=True)
        np.testing.assert_array_equal(again["image"], batch["image"])


def test_too_many_bad_files_fail_clearly(data_dir):
    from lsgd_jax.data import BadDataError

    with open_source(data_dir, max_bad_fraction=0.03) as src:  # 1.2 of 40 allowed
        with pytest.raises(BadDataError, match="2 of 40 examples .* max_bad_fraction=0.03"):
            src.get_batch(np.arange(NUM), seed=0, epoch=0, train=True)


def test_decoding_threads_do_not_change_results(data_dir):
    with open_source(data_dir, decode_threads=1) as one, open_source(data_dir, decode_threads=3) as three:
        ids = np.random.default_rng(0).permutation(NUM)[:24]
        a = one.get_batch(ids, seed=4, epoch=1, train=True)
        b = three.get_batch(ids, seed=4, epoch=1, train=True)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        # Augmentation depends on the epoch (flip/crop of the textured corner).
        c = one.get_batch(ids, seed=4, epoch=2, train=True)
        assert not np.array_equal(a["image"], c["image"])


def test_two_process_resume_on_tfds_equals_uninterrupted(data_dir):
    with open_source(data_dir) as src:
        def stream(steps, position=None):
            iters = [TrainIterator(src, global_batch_size=8, seed=9, process_index=p,
                                   process_count=2, position=position) for p in range(2)]
            out = [np.concatenate([next(it)["image"] for it in iters]) for _ in range(steps)]
            return out, iters[0].position

        reference, _ = stream(8)  # 5 steps per epoch: crosses into epoch 1
        first, position = stream(3)
        assert position == Position(0, 3)
        rest, _ = stream(5, position=position.to_dict())
        for x, y in zip(first + rest, reference):
            np.testing.assert_array_equal(x, y)


def test_eval_scores_each_validation_example_once(data_dir):
    with open_source(data_dir, split="validation") as src:
        seen = []
        streams = [list(eval_batches(src, global_batch_size=12, process_index=p, process_count=2))
                   for p in range(2)]
        assert len(streams[0]) == len(streams[1]) == 4
        for stream in streams:
            for b in stream:
                seen += [example_of(im) for im in b["image"][b["mask"] == 1]]
        good = [n for n in range(NUM) if n not in (CORRUPT, TRUNCATED)]
        # 40 slots: the 38 good examples once each, plus the 2 replacements of bad files.
        assert len(seen) == NUM and set(seen) == set(good)
        counts = np.bincount(seen, minlength=NUM)
        assert counts[good].min() == 1 and counts.sum() - len(good) == 2


def test_unprepared_or_unknown_data_set_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_imagenet.py --manual-dir"):
        get_source("imagenet", split="train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown tfds data set"):
        get_source("imagenet", split="train", data_dir=str(tmp_path), builder_name="no_such_set")


def test_bad_reader_arguments(data_dir):
    with pytest.raises(ValueError, match="no split 'test'"):
        open_source(data_dir, split="test")
    with pytest.raises(ValueError, match="decode_threads"):
        open_source(data_dir, decode_threads=0)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        open_source(data_dir, max_bad_fraction=1.5)


def test_a_damaged_block_costs_only_its_records(data_dir, tmp_path, caplog):
    """4 KiB overwritten inside a shard: the records stored there are bad like undecodable
    images (counted, logged with the shard's file, replaced by the next good example); every
    other example reads and decodes as from the intact file."""
    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    lost = unreadable_ids(shard)
    assert 1 <= len(lost) <= 12, "the damage should hit a few records, not the whole shard"
    ids = np.arange(NUM)
    with open_source(data_dir) as intact:
        reference = intact.get_batch(ids, seed=3, epoch=1, train=True)
        numbers = file_numbers(intact, ids)
    with open_source(copy, max_bad_fraction=0.5) as src, \
            caplog.at_level(logging.WARNING, logger="lsgd_jax.data.imagenet"):
        batch = src.get_batch(ids, seed=3, epoch=1, train=True)
        bad = src.bad_examples
    assert sorted(i for i, name in bad.items() if name == shard) == lost
    assert set(bad) == set(lost) | {numbers.index(CORRUPT), numbers.index(TRUNCATED)}
    for i in lost:
        assert f"unreadable record id={i} in shard {shard} (RuntimeError: " in caplog.text
    for i in ids:
        if i not in bad:
            np.testing.assert_array_equal(batch["image"][i], reference["image"][i])
            continue
        j = next(j % NUM for j in range(i + 1, i + NUM) if j % NUM not in bad)
        assert example_of(batch["image"][i]) == numbers[j]
        assert batch["label"][i] == numbers[j] % 4


def test_unreadable_records_over_the_limit_name_the_shard_in_one_line(data_dir, tmp_path):
    from lsgd_jax.data import BadDataError

    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    lost = unreadable_ids(shard)
    with open_source(copy, max_bad_fraction=0.0) as src:
        with pytest.raises(BadDataError) as info:
            src.get_batch(np.array(lost[:1]), seed=0, epoch=0, train=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"1 of 40 examples of {BUILDER}/train (2.5 %) are bad, more than max_bad_fraction=0.0 "
        f"allows: 1 unreadable record(s) in the damaged shard file(s) {shard}. Prepare the data "
        f"set again (delete {os.path.dirname(shard)} and re-run experiments/prepare_imagenet.py)")


def test_a_shard_that_cannot_be_opened_is_named_when_the_split_is_opened(data_dir, tmp_path):
    from lsgd_jax.data.imagenet import DamagedShardError

    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "truncate")
    hint = (f"). If it is damaged or truncated, prepare the data set again: delete "
            f"{os.path.dirname(shard)} and run `python experiments/prepare_imagenet.py "
            f"--manual-dir MANUAL_DIR --data-dir {copy} --builder {BUILDER}`")
    opening = f"{shard}: shard 1 of 1 of {BUILDER}/train cannot be opened ("
    with pytest.raises(DamagedShardError, match=re.escape(opening) + ".*" + re.escape(hint)):
        open_source(copy)
    os.remove(shard)
    with pytest.raises(DamagedShardError, match=re.escape(opening + "the file is missing)")):
        open_source(copy)
    with open_source(copy, split="validation") as src:  # the other split's files are intact
        assert src.num_examples == NUM
