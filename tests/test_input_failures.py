"""The input pipeline's failures as the trainer's command line reports them.

A damaged block of an ArrayRecord shard costs only the records stored in it, so the run
gets past it (on every resume too); a shard that cannot be opened, too many bad examples,
or a /dev/shm too small for the decode workers end the run with one line naming the
file (or /dev/shm) and what to do, exit status 2, no traceback. Every run is a real
``lsgd-jax train`` process on the tiny tfds set (``tiny_imagenet.py``), bounded in time.
"""

import os
import re
import sys

import pytest
from helpers import ROOT, in_small_dev_shm, run_bounded, subprocess_env

pytest.importorskip("tensorflow_datasets")
from tiny_imagenet import (  # noqa: E402
    BUILDER,
    CORRUPT,
    NUM,
    TRUNCATED,
    damaged_copy,
    unreadable_ids,
)

pytestmark = pytest.mark.slow
FLAGS = ["--data", "imagenet", "--tfds-name", BUILDER, "--model", "resnet8", "--image-size",
         "16", "--batch-size", "8", "--bn-group-size", "4", "--eval-batch-size", "8",
         "--dtype", "float32", "--epochs", "1", "--warmup-epochs", "0", "--decay-epochs=",
         "--decode-threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tiny_tfds):
    return tiny_tfds


def train(workdir, data_dir, *flags, prefix=(), timeout=300):
    command = [*prefix, sys.executable, "-m", "lsgd_jax", "train", "--workdir", str(workdir),
               "--data-dir", data_dir, *FLAGS, "--cpu-devices", "1", *flags]
    return run_bounded(command, timeout=timeout, env=subprocess_env(), cwd=ROOT)


def error_lines(done) -> list[str]:
    """The run's own error lines; asserts that nothing else went wrong loudly."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_block_is_counted_and_the_run_and_its_resume_get_past_it(data_dir, tmp_path,
                                                                            workers):
    """2 of the epoch's 5 steps, then a resume to its end: the damaged records (in most
    batches) are counted and named each time and neither run stops at them."""
    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    lost = unreadable_ids(shard)
    flags = ["--max-bad-fraction", "0.4", "--decode-workers", str(workers)]
    first = train(tmp_path / "run", copy, *flags, "--num-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(tmp_path / "run", copy, *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "done: 5 steps" in second.stdout
    logged = [{int(i) for i in re.findall(rf"unreadable record id=(\d+) in shard "
                                          rf"{re.escape(shard)} \(RuntimeError: Corrupted Riegeli",
                                          done.stderr)} for done in (first, second)]
    assert logged[0] and logged[1]
    assert logged[0] | logged[1] == set(lost)  # the epoch reads every id: each one named


def seed_meeting_an_undecodable_image_first(data_dir, lost):
    """A --seed whose shuffle puts an undecodable image before every unreadable record."""
    from lsgd_jax.data import get_source, shard_indices

    with get_source("imagenet", split="train", data_dir=data_dir, builder_name=BUILDER,
                    decode_threads=1) as src:
        names = [src._records[i]["file_name"].decode() for i in range(NUM)]
    images = {i for i, n in enumerate(names) if n in (f"n0000_{CORRUPT}.JPEG",
                                                      f"n0000_{TRUNCATED}.JPEG")} - set(lost)
    for seed in range(200):
        (order,) = shard_indices(NUM, global_batch_size=NUM, seed=seed, epoch=0,
                                 process_index=0, process_count=1)
        if next(i for i in order if i in images or i in lost) in images:
            return seed
    raise AssertionError("no such seed in 200")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_records_over_the_limit_end_the_run_in_one_line(data_dir, tmp_path, workers):
    """One batch of the whole split, shuffled so that an undecodable image comes first:
    its unreadable records are counted as they are read, before any image is decoded, so
    the line names the damaged shard."""
    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    seed = seed_meeting_an_undecodable_image_first(data_dir, unreadable_ids(shard))
    done = train(tmp_path / "run", copy, "--max-bad-fraction", "0", "--batch-size", str(NUM),
                 "--seed", str(seed), "--decode-workers", str(workers))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert line.startswith(f"error: 1 of {NUM} examples of {BUILDER}/train (2.5 %) are bad, "
                           "more than max_bad_fraction=0.0 allows: 1 unreadable record(s) in "
                           f"the damaged shard file(s) {shard}. Prepare the data set again")


def test_undecodable_images_over_the_limit_end_the_run_in_one_line(data_dir, tmp_path):
    done = train(tmp_path / "run", data_dir, "--max-bad-fraction", "0", "--batch-size",
                 str(NUM), "--decode-workers", "0")
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert re.match(rf"error: 1 of {NUM} examples of {BUILDER}/train \(2.5 %\) are bad, .* 1 "
                    r"undecodable image\(s\), ids and files: \[\(\d+, 'n0000_\d+.JPEG'\)\]\. "
                    "Check those files", line), line


def test_a_truncated_shard_is_named_before_training(data_dir, tmp_path):
    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "truncate")
    done = train(tmp_path / "run", copy, "--decode-workers", "2")
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert line.startswith(f"error: {shard}: shard 1 of 1 of {BUILDER}/train cannot be opened (")
    assert (f"delete {os.path.dirname(shard)} and run `python experiments/prepare_imagenet.py "
            f"--manual-dir MANUAL_DIR --data-dir {copy} --builder {BUILDER}`") in line
    assert "compiling" not in done.stdout and "input:" not in done.stdout


# ---------------------------------------------------------------- /dev/shm
# The decode workers' slots at --image-size 32: 4 slots of 8 (one process) or 4 (each of
# two) images of 3 KiB. The training process's TensorBoard writer holds 12 KiB of /dev/shm
# too (three semaphores).
SHM_FLAGS = ["--image-size", "32", "--decode-workers", "2"]


def test_a_dev_shm_too_small_for_the_slots_is_one_line_before_training(data_dir, tmp_path):
    done = train(tmp_path / "run", data_dir, *SHM_FLAGS, prefix=in_small_dev_shm("64k"))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert line == ("error: /dev/shm has too little room for the decode workers' batch slots: "
                    "52 KiB free, and this process needs 96 KiB (4 slots of 8 images for 2 "
                    "--decode-workers); use fewer --decode-workers (0: decode in the training "
                    "process, no shared memory) or a smaller --batch-size, or enlarge /dev/shm "
                    "(Docker: --shm-size)")
    assert "compiling" not in done.stdout
    assert done.stdout.rstrip().endswith("left in /dev/shm: []")


def test_two_processes_that_do_not_both_fit_in_dev_shm_fail_cleanly(data_dir, tmp_path):
    """Each process alone fits; the second to reserve its slots is refused before training,
    naming /dev/shm, instead of a worker dying of SIGBUS once the pages are touched; the
    other process ends with the same line instead of waiting for it."""
    launcher = ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "1"]
    env = subprocess_env() | {"PYTHON": sys.executable}
    command = [*in_small_dev_shm("80k"), *launcher, "--workdir", str(tmp_path / "run"),
               "--data-dir", data_dir, *FLAGS, *SHM_FLAGS]
    done = run_bounded(command, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    # Each process names itself ("error: process 1: ..."), then the same message.
    lines = {re.sub(r"^error: process \d: ", "error: ", line)
             for line in done.stderr.splitlines() if line.startswith("error:")}
    assert len(lines) == 1, done.stderr[-3000:]
    lines = list(lines)
    assert re.fullmatch(
        r"error: /dev/shm has too little room for the decode workers' batch slots: \d+ KiB "
        r"free, and each of this host's 2 training processes needs 48 KiB \(4 slots of 4 "
        r"images for 2 --decode-workers\), 97 KiB in all; use fewer --decode-workers .* "
        r"or a smaller --batch-size, or enlarge /dev/shm \(Docker: --shm-size\)", lines[0])
    assert "signal 7" not in done.stderr and "SIGBUS" not in done.stderr
    assert done.stdout.rstrip().endswith("left in /dev/shm: []")
