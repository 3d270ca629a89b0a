"""Decoding worker processes: the same batches as in-process decoding, failures, shutdown.

Every test that starts processes bounds its time and checks that they are gone.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_same_batches, global_batches
from workers_fake import AllocatingSource, FakeSource

from lsgd_jax.data import BadDataError, Position, TrainIterator, get_source
from lsgd_jax.data.workers import DecodeWorkerError, WorkerTrainIterator, default_decode_workers

pytestmark = pytest.mark.timeout(120)
HERE = os.path.dirname(os.path.abspath(__file__))


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def data_dir(tiny_tfds):
    return tiny_tfds


def open_imagenet(data_dir, **kwargs):
    from tiny_imagenet import BUILDER

    kwargs = {"builder_name": BUILDER, "image_size": 16, "eval_resize": 20,
              "max_bad_fraction": 0.1, "decode_threads": 2, **kwargs}
    return get_source("imagenet", split="train", data_dir=data_dir, **kwargs)


def test_workers_give_the_batches_of_in_process_decoding_bit_for_bit(data_dir, caplog):
    """0, 1 or 3 workers, 1 or 2 processes: the same global batches over 2+ epochs (5 steps
    per epoch), with the corrupt and truncated files of the data set replaced alike."""
    kw = dict(global_batch_size=8, seed=5)
    with open_imagenet(data_dir) as src:
        reference = global_batches([TrainIterator(src, **kw)], 12)
        bad_threads = src.bad_examples
    assert len(bad_threads) == 2  # the stream did meet both bad files
    for workers, processes in ((1, 1), (3, 1), (2, 2)):
        with open_imagenet(data_dir) as src, caplog.at_level(logging.WARNING):
            caplog.clear()
            its = [WorkerTrainIterator(src, decode_workers=workers, process_index=p,
                                       process_count=processes, **kw) for p in range(processes)]
            try:
                assert_same_batches(global_batches(its, 12), reference)
                # Found by the workers, logged and counted by the training process.
                assert src.bad_examples == bad_threads
                assert all(f"id={i}" in caplog.text for i in bad_threads)
                assert its[0].position == Position(2, 2)
            finally:
                for it in its:
                    it.close()
            assert _wait_gone([pid for it in its for pid in it.pids])


def test_workers_resume_at_the_data_position(data_dir):
    kw = dict(global_batch_size=8, seed=9, decode_workers=2)
    with open_imagenet(data_dir) as src:
        with _closing(WorkerTrainIterator(src, **kw)) as it:
            reference = global_batches([it], 8)
        with _closing(WorkerTrainIterator(src, **kw)) as it:
            first = global_batches([it], 3)
            position = it.position
        assert position == Position(0, 3)
        with _closing(WorkerTrainIterator(src, position=position.to_dict(), **kw)) as it:
            rest = global_batches([it], 5)
    assert_same_batches(first + rest, reference)


def test_too_many_bad_files_fail_as_in_process(data_dir):
    with open_imagenet(data_dir, max_bad_fraction=0.03) as src:
        it = WorkerTrainIterator(src, decode_workers=2, global_batch_size=40, seed=0)
        with pytest.raises(BadDataError, match="2 of 40 examples .* max_bad_fraction=0.03"):
            next(it)
        assert _wait_gone(it.pids)


class _closing:
    def __init__(self, it):
        self.it = it

    def __enter__(self):
        return self.it

    def __exit__(self, *exc):
        self.it.close()


def _wait_gone(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_fake_source_through_workers_equals_in_process():
    src = FakeSource()
    reference = global_batches([TrainIterator(src, global_batch_size=4, seed=2)], 25)
    with _closing(WorkerTrainIterator(src, decode_workers=2, global_batch_size=4, seed=2,
                                      slots=3)) as it:
        assert_same_batches(global_batches([it], 25), reference)


@pytest.mark.parametrize("failure, match", [
    ("die_at", r"decode worker \d \(pid \d+\) exited with code 3"),
    ("hang_at", r"decode worker \d \(pid \d+\) hangs: no image finished in 1.5 s while it owes "
                r"the batch of epoch \d+, step \d+"),
])
def test_a_worker_that_dies_or_hangs_is_named_within_seconds(failure, match):
    # The id is read at the 6th step or so: the first batches come normally.
    src = FakeSource(**{failure: 23})
    order = TrainIterator(src, global_batch_size=4, seed=1)
    when = next(k for k in range(10) if 23 in order._ids(0)[k])
    it = WorkerTrainIterator(src, decode_workers=2, global_batch_size=4, seed=1,
                             stall_timeout=1.5)
    t = time.monotonic()
    with pytest.raises(DecodeWorkerError, match=match):
        for _ in range(when + 1):
            next(it)
    assert time.monotonic() - t < 10.0
    assert _wait_gone(it.pids), "close() after the failure stops the other worker too"
    with pytest.raises(DecodeWorkerError, match="stopped"):
        next(it)


def test_a_worker_keeps_the_memory_its_decodes_free_instead_of_faulting_it_in_again():
    # glibc's defaults in a fresh process give the heap's top back after each image, and
    # the next image faults ~450 pages in again per 1.8 MB; the worker's settings keep it.
    it = WorkerTrainIterator(AllocatingSource(), decode_workers=1, global_batch_size=4, seed=0)
    try:
        faults = [next(it)["label"] for _ in range(5)]
    finally:
        it.close()
    assert max(int(f.max()) for f in faults[1:]) < 50, faults  # past the first batch


def test_a_worker_whose_pipe_closes_before_it_has_ended_is_named_with_its_end():
    """The race of a loaded machine: a worker's pipe is already closed when the next batch
    is sent to it, but the process ends only later, and another worker's message is ready
    at once. The error still says how the worker ended, not only that its pipe closed."""
    import threading

    it = WorkerTrainIterator(FakeSource(), decode_workers=2, global_batch_size=4, seed=1,
                             slots=4)
    try:
        next(it)
        victim = it.pids[0]

        class ClosedPipe:
            def __init__(self, conn):
                self.conn = conn

            def send(self, obj):
                raise BrokenPipeError(32, "Broken pipe")

            def __getattr__(self, name):
                return getattr(self.conn, name)

        it._conns[0] = ClosedPipe(it._conns[0])
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        with pytest.raises(DecodeWorkerError, match=rf"decode worker 0 \(pid {victim}\) was "
                                                     r"killed by signal 9 \(after \d+ images\)"):
            for _ in range(10):
                next(it)
    finally:
        it.close()


def _as_from_a_terminal():
    """SIGINT back to its default in the child: a test run started in the background of
    a non-interactive shell (``cmd &``) inherits it ignored, and Python keeps an ignored
    SIGINT ignored, so Ctrl-C would never reach the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_training_process_leaves_no_process_behind(how):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "workers_fake.py")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True, preexec_fn=_as_from_a_terminal)
    try:
        info = json.loads(child.stdout.readline() or "{}")
        assert info.get("workers"), child.stderr.read()
        if how == "ctrl-c":  # the terminal sends SIGINT to the whole process group
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:  # say where it hangs, and what is still there
            child.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            child.kill()
            pytest.fail(f"the run did not end within 20 s of {how}; its processes: "
                        f"{_states(_session(child.pid))}; its stacks:\n"
                        f"{child.communicate(timeout=10)[1][-6000:]}")
        assert _wait_gone(info["workers"], 10.0), f"workers outlived the run ({how})"
        # Nothing of the session survives (the resource tracker included) and the shared
        # memory is freed.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and (_session(child.pid) or os.path.exists(
                f"/dev/shm/{info['shm']}")):
            time.sleep(0.1)
        assert not _session(child.pid), f"processes outlived the run: {_session(child.pid)}"
        assert not os.path.exists(f"/dev/shm/{info['shm']}")
        if how != "ctrl-c":  # (the fake's main shows its KeyboardInterrupt)
            errors = child.communicate(timeout=10)[1]
            assert "Traceback" not in errors, f"the workers' ends were not quiet:\n{errors}"
    finally:
        for pid in _session(child.pid):
            os.kill(pid, signal.SIGKILL)
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)


def _states(pids):
    """pid, state and command line of each process, for a failure message."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        out.append(f"{pid} {state} {command}")
    return out


def _session(sid):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                pids.append(int(name))
    return pids


def test_bad_worker_arguments_and_default():
    src = FakeSource()
    with pytest.raises(ValueError, match="decode_workers must be a positive integer, got 0"):
        WorkerTrainIterator(src, decode_workers=0, global_batch_size=4, seed=0)

    class NoWorkers:
        num_examples, image_shape = 8, (1, 1, 1)

    with pytest.raises(ValueError, match="cannot be decoded in worker processes"):
        WorkerTrainIterator(NoWorkers(), decode_workers=1, global_batch_size=4, seed=0)
    assert [default_decode_workers(c) for c in (1, 2, 3, 4, 16)] == [0, 0, 0, 3, 15]


@pytest.mark.parametrize("env, processes", [
    ({}, 1),
    ({"LOCAL_WORLD_SIZE": "8"}, 8),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
    ({"SLURM_NTASKS_PER_NODE": "2"}, 2),
    ({"SLURM_TASKS_PER_NODE": "8(x4),4"}, 8),   # the first node's count
    ({"SLURM_TASKS_PER_NODE": "garbage", "LOCAL_WORLD_SIZE": "0"}, 1),
])
def test_the_launcher_says_how_many_processes_share_this_host(env, processes):
    from lsgd_jax.data.workers import local_process_count

    assert local_process_count(env) == processes


def test_default_workers_share_the_allowed_cores_among_the_hosts_processes():
    """96 cores and 8 processes a host: 12 cores each, 11 workers, not 95 each (760
    decoders on 96 cores); a cpuset of 16 cores for 1 process: 15."""
    from lsgd_jax.data.workers import usable_cores

    assert usable_cores({"LOCAL_WORLD_SIZE": "8"}, allowed=96) == 12
    assert default_decode_workers(usable_cores({"LOCAL_WORLD_SIZE": "8"}, allowed=96)) == 11
    assert usable_cores({}, allowed=16) == 16
    assert usable_cores({"LOCAL_WORLD_SIZE": "8"}, allowed=4) == 1  # never 0
    # This process's own affinity, not the machine's core count.
    assert usable_cores({}) == len(os.sched_getaffinity(0))


def test_train_stream_chooses_and_says_how_it_decodes(data_dir):
    from lsgd_jax.data import train_stream
    from lsgd_jax.training.config import TrainConfig

    lines = []
    with open_imagenet(data_dir) as src:
        for workers, kind in ((2, WorkerTrainIterator), (0, TrainIterator)):
            config = TrainConfig(data="imagenet", decode_workers=workers, batch_size=8)
            it = train_stream(src, config, global_batch_size=8, log=lines.append)
            assert type(it) is kind
            it.close()
    assert lines[0].startswith("input: 2 decoding worker processes per process (")
    assert "--decode-workers 2), resize opencv" in lines[0]
    assert lines[1] == ("input: in the training process (2 decoding threads, resize opencv; "
                        "--decode-workers 0)")
    with pytest.raises(ValueError, match=r"--decode-workers must be an integer in \[0, 1024\], got -1"):
        TrainConfig(decode_workers=-1)


@pytest.mark.slow
def test_training_with_workers_equals_training_with_threads(data_dir, tmp_path):
    """The trainer end to end: the same losses at every step, and the same final state."""
    from tiny_imagenet import BUILDER

    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.loop import train_and_evaluate
    from lsgd_jax.training.metrics import read_metrics

    config = TrainConfig(data="imagenet", data_dir=data_dir, tfds_name=BUILDER, model="resnet20",
                         image_size=16, batch_size=16, bn_group_size=2, eval_batch_size=16,
                         dtype="float32", epochs=2, warmup_epochs=0, decay_epochs=(),
                         max_bad_fraction=0.2, decode_threads=2, log_every_steps=1)
    losses, digests = [], []
    for workers in (0, 2):
        run = str(tmp_path / f"run{workers}")
        train_and_evaluate(config.replace(decode_workers=workers), run, log=lambda m: None)
        records = read_metrics(run, "train")
        losses.append([r["loss"] for r in records])
        assert all(0.0 <= r["input_wait_fraction"] <= 1.0 for r in records)
        digests.append(read_metrics(run, "checkpoint")[-1]["state_sha256"])
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert digests[0] == digests[1]


def test_a_worker_that_cannot_open_the_data_fails_before_any_batch():
    with pytest.raises(DecodeWorkerError, match=r"decode worker \d \(pid \d+\) failed:\n"
                                                r"(.|\n)*FileNotFoundError: no data set here"):
        WorkerTrainIterator(FakeSource(fail_in_worker=True), decode_workers=2,
                            global_batch_size=4, seed=0)


RING_SCRIPT = """
import json, os
from workers_fake import AllocatingSource, FakeSource
from lsgd_jax.data.workers import WorkerTrainIterator

kw = dict(decode_workers=1, slots=2, global_batch_size=1000, seed=0)
first = WorkerTrainIterator(FakeSource(num_examples=4000), **kw)
try:
    WorkerTrainIterator(FakeSource(num_examples=4000), **kw)
    refused = ""
except ValueError as e:
    refused = str(e)
out = {"refused": refused, "left": os.listdir("/dev/shm"), "first": first._shm.name}
out["batch"] = len(next(first)["label"])  # the reserved slots work
first.close()
print(json.dumps(out), flush=True)
"""


def test_each_ring_reserves_its_shared_memory_and_the_one_without_room_is_refused():
    """A 48 KiB /dev/shm and two rings of 31 KiB (as two processes of a host would make):
    the first reserves its pages, the second is refused at once naming /dev/shm, what it
    needs per process and in all, what is free and what to change; it leaves nothing."""
    from helpers import in_small_dev_shm, run_bounded

    env = dict(os.environ, LOCAL_WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    done = run_bounded([*in_small_dev_shm("48k"), sys.executable, "-c", RING_SCRIPT],
                       timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result, left = done.stdout.splitlines()[-2:]
    result = json.loads(result)
    assert result["refused"] == (
        "/dev/shm has too little room for the decode workers' batch slots: 16 KiB free, and "
        "each of this host's 2 training processes needs 31 KiB (2 slots of 1000 images for 1 "
        "--decode-workers), 63 KiB in all; use fewer --decode-workers (0: decode in the "
        "training process, no shared memory) or a smaller --batch-size, or enlarge /dev/shm "
        "(Docker: --shm-size)")
    assert result["left"] == [result["first"]] and result["batch"] == 1000
    assert left == "left in /dev/shm: []"


def test_sizes_below_a_mebibyte_are_not_zero():
    from lsgd_jax.data.workers import size_text

    assert [size_text(n) for n in (100, 64 << 10, 300 << 10, (1 << 20) - 1, 3 << 19,
                                   1200 << 20)] == [
        "100 bytes", "64 KiB", "300 KiB", "1024 KiB", "1.5 MiB", "1200 MiB"]


def test_a_worker_killed_by_sigbus_is_reported_as_a_full_dev_shm():
    it = WorkerTrainIterator(FakeSource(), decode_workers=2, global_batch_size=4, seed=1)
    try:
        next(it)
        victim = it.pids[0]
        os.kill(victim, signal.SIGBUS)
        with pytest.raises(DecodeWorkerError, match=rf"decode worker 0 \(pid {victim}\) was "
                                                     r"killed by signal 7 \(SIGBUS\): /dev/shm "
                                                     r"is probably full \(after \d+ images\); "
                                                     r"free it or enlarge it"):
            for _ in range(10):
                next(it)
    finally:
        it.close()


def test_workers_count_a_damaged_block_as_in_process_decoding(data_dir, tmp_path):
    from tiny_imagenet import damaged_copy, unreadable_ids

    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    kw = dict(global_batch_size=8, seed=5)
    with open_imagenet(copy, max_bad_fraction=0.4) as src:
        reference = global_batches([TrainIterator(src, **kw)], 5)
        bad = src.bad_examples
    assert {i for i, name in bad.items() if name == shard} == set(unreadable_ids(shard))
    with open_imagenet(copy, max_bad_fraction=0.4) as src:
        with _closing(WorkerTrainIterator(src, decode_workers=2, **kw)) as it:
            assert_same_batches(global_batches([it], 5), reference)
        assert src.bad_examples == bad


def test_a_shard_that_stops_opening_is_named_in_one_line_by_a_worker(data_dir, tmp_path):
    """Truncated after the training process opened the split: the worker that meets it
    names the file; no worker traceback reaches the error."""
    from tiny_imagenet import damaged_copy

    copy, shard = damaged_copy(data_dir, tmp_path / "tfds", "block")
    with open_imagenet(copy) as src:
        os.truncate(shard, os.path.getsize(shard) // 2)
        it = WorkerTrainIterator(src, decode_workers=2, global_batch_size=8, seed=0)
        with pytest.raises(BadDataError) as info:
            next(it)
        assert _wait_gone(it.pids)
    message = str(info.value)
    assert message.startswith(f"{shard}: shard 1 of 1 of lsgd_tiny_imagenet/train cannot be "
                              "opened (")
    assert "\n" not in message and "Traceback" not in message
