"""Decoding in worker processes: whole local batches written into shared memory.

Threads in one process share one GIL, which caps a process near a few thousand images
per second whatever its cores; a GPU needs more. ``WorkerTrainIterator`` is a
``TrainIterator`` whose batches are decoded by ``N`` worker processes:

* The training process alone computes every batch's ids (Remark 4's sampler, exactly as
  ``TrainIterator``) and sends batch ``k`` (its ids, seed and epoch) to worker
  ``k mod N``, at most ``slots`` batches ahead of the consumer.
* A worker decodes the whole batch into batch slot ``k mod slots`` of one
  ``multiprocessing.shared_memory`` block and answers with a short message. Nothing
  is pickled but ids and that message; the training process copies the slot out
  (a memcpy) and hands it on. Every image's augmentation is a function of
  (seed, epoch, id) (``augment.example_uniforms``) and a worker runs the source's own
  ``decode_into``, so the batches are bit for bit those of ``TrainIterator``, for any
  number of workers and of processes; ``position`` resumes exactly as it does.
* Bad examples (undecodable images, unreadable records): a worker replaces them as the
  source does and reports them; the training process logs and counts them
  (``max_bad_fraction``) in batch order. A worker's ``BadDataError`` reaches the
  training process as its one-line message.
* Failures never hang: a worker that exits is reported at once, one that has not
  finished an image for ``stall_timeout`` seconds is reported as hung, by index and
  pid; the workers are then stopped and the error raised by ``next()``.
* Shutdown: ``close()`` (also at interpreter exit) stops and joins the workers and
  frees the shared memory. Workers ignore SIGINT (Ctrl-C reaches the whole process
  group; the training process decides) and die with the training process
  (``PR_SET_PDEATHSIG``, and a parent check twice a second).

Workers are started with ``forkserver``: a server process, started once by ``exec`` (so
it inherits none of the training process's threads, JAX runtime or device state, which
``fork`` would copy in an unsafe state), imports this module and forks each worker from
itself. A worker starts in milliseconds and shares the imported modules' pages; with
``spawn`` each would import JAX, NumPy and PIL anew (about a second and 200 MB each).
The server holds only the idle thread pools that NumPy and OpenCV start at import.

``WorkerEvalIterator`` runs the evaluation's padded batches (``pipeline.eval_batches``:
every example once over all processes, the same masks) through the same ring, workers,
failure reports and shutdown, with the eval transform, for one pass.

A source supports workers when it has ``worker_opener()`` (returning a callable and
its kwargs that open the same split in a worker), ``decode_into(...)``,
``report_bad_to(report)`` (a worker's copy sends its bad examples to ``report``) and
``note_bad(i, name, error, shard)`` (the training process's copy counts them; see
``imagenet.ImageNetSource``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import time
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

import lsgd_jax.base.checks as checks
from lsgd_jax.base.host import pid_alive
from lsgd_jax.data.pipeline import TrainIterator, num_eval_batches
from lsgd_jax.data.sampler import Position, eval_indices
from lsgd_jax.data.source import BadDataError


class DecodeWorkerError(RuntimeError):
    """A decoding worker process exited, hung or failed."""


LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def local_process_count(env=None) -> int:
    """Training processes on this host, as the launcher announces them (torchrun-style
    ``LOCAL_WORLD_SIZE``, Open MPI, SLURM); 1 when none does. SLURM's
    ``SLURM_TASKS_PER_NODE`` reads like "8(x4),4": the first node's count is taken."""
    env = os.environ if env is None else env
    for key in LOCAL_SIZE_VARIABLES:
        digits = ""
        for ch in env.get(key, "").strip():
            if not ch.isdigit():
                break
            digits += ch
        if digits and int(digits) >= 1:
            return int(digits)
    return 1


def usable_cores(env=None, allowed: int | None = None) -> int:
    """Cores this process may decode on: the CPUs it is allowed to run on (a cgroup
    cpuset or ``taskset`` shrinks them), shared evenly with the other training
    processes of this host (``local_process_count``), at least 1."""
    if allowed is None:
        try:
            allowed = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            allowed = os.cpu_count() or 1
    return max(1, allowed // local_process_count(env))


def default_decode_workers(cores: int | None = None) -> int:
    """Worker processes for ``cores`` cores: one core is left to the training process.

    Below 4 cores, 0 (threads in the training process): their GIL ceiling (thousands
    of images/s) is then far above what the cores can decode.
    """
    cores = cores or usable_cores()
    return cores - 1 if cores >= 4 else 0


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


class _Layout:
    """Offsets in the shared block: a progress counter per worker, then the slots."""

    def __init__(self, workers: int, slots: int, batch: int, image_shape):
        self.workers, self.slots, self.batch = workers, slots, batch
        self.image_shape = tuple(image_shape)
        self.image_bytes = batch * int(np.prod(image_shape))
        self.slot_bytes = _align(self.image_bytes) + _align(4 * batch)
        self.header = _align(8 * workers)
        self.size = self.header + slots * self.slot_bytes

    def views(self, buf):
        progress = np.ndarray((self.workers,), np.int64, buf, 0)
        slots = []
        for s in range(self.slots):
            at = self.header + s * self.slot_bytes
            images = np.ndarray((self.batch, *self.image_shape), np.uint8, buf, at)
            labels = np.ndarray((self.batch,), np.int32, buf, at + _align(self.image_bytes))
            slots.append((images, labels))
        return progress, slots


def size_text(n: int) -> str:
    """``n`` bytes for a message: KiB below 1 MiB, so that a small size never reads "0 MiB"."""
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.{1 if n < 10 * 2**20 else 0}f} MiB"


def _no_room(layout: _Layout) -> str:
    """The one-line refusal of a ring that /dev/shm cannot hold."""
    processes = local_process_count()
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    need = (f"each of this host's {processes} training processes needs "
            if processes > 1 else "this process needs ")
    need += (f"{size_text(layout.size)} ({layout.slots} slots of {layout.batch} images for "
             f"{layout.workers} --decode-workers)")
    if processes > 1:
        need += f", {size_text(processes * layout.size)} in all"
    return (f"/dev/shm has too little room for the decode workers' batch slots: "
            f"{size_text(free)} free, and {need}; use fewer --decode-workers (0: decode in the "
            "training process, no shared memory) or a smaller --batch-size, or enlarge "
            "/dev/shm (Docker: --shm-size)")


def _create_ring(layout: _Layout) -> shared_memory.SharedMemory:
    """The shared block, its pages allocated now: tmpfs counts a page only once touched, so
    a /dev/shm too small for all the processes of a host would otherwise show much later,
    as a worker killed by SIGBUS. Each process reserves its own; the one that finds no
    room raises ``ValueError`` and leaves nothing behind."""
    try:
        shm = shared_memory.SharedMemory(create=True, size=layout.size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):  # not even an inode left
            raise ValueError(_no_room(layout)) from None
        raise
    if not hasattr(os, "posix_fallocate"):  # not Linux: pages come as they are touched
        return shm
    try:
        os.posix_fallocate(shm._fd, 0, layout.size)  # type: ignore[attr-defined]
    except OSError as e:
        shm.close()
        shm.unlink()
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ValueError(_no_room(layout)) from None
        raise
    return shm


def _die_with_parent(trainer_pid: int):
    """Dies with the fork server (which exits when the training process does) and returns
    a check that the training process and the server still run."""
    try:  # Linux: SIGKILL this process when its parent (the fork server) dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    server = os.getppid()
    if not pid_alive(trainer_pid):
        os._exit(1)
    return lambda: os.getppid() == server and pid_alive(trainer_pid)


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lsgd_jax.data.workers"])
    return ctx


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Lets glibc's allocator keep the memory that decoding frees, for the next image.

    A decode allocates and frees the same few large buffers per image (the decoded
    picture, the crop, the resized output). In a fresh process, glibc serves buffers over
    its 128 KiB threshold with ``mmap`` and gives the heap's free top back to the system
    beyond twice the largest freed block, so each image faults its buffers in anew, page
    by page. A worker started from the slim fork server decoded 25 % slower per image
    than one that inherited a large process's raised thresholds (1.58 against 1.25 CPU ms;
    ``experiments/bench_input_pipeline.py``). Fixing the thresholds at glibc's own
    ceilings (32 MiB, and 64 MiB before trimming) keeps a worker's peak, a few decoded
    images, in its heap. Returns whether the allocator took the settings (False where
    there is no glibc ``mallopt``: other allocators are left alone).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mapped = mallopt(M_MMAP_THRESHOLD, 32 << 20)
    trimmed = mallopt(M_TRIM_THRESHOLD, 64 << 20)
    return bool(mapped and trimmed)


def _worker_main(index, opener, options, shm_name, layout, conn, trainer_pid) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    parent_alive = _die_with_parent(trainer_pid)
    try:
        shm = shared_memory.SharedMemory(name=shm_name)
        progress, slots = layout.views(shm.buf)
        source = opener(**options)
    except BaseException:  # noqa: BLE001 (reported to the training process)
        conn.send(("failed", None, "", traceback.format_exc()))
        return
    found: list = []
    images = labels = None
    source.report_bad_to(lambda i, name, error, shard=None: found.append((i, name, error, shard)))

    def serial_map(fn, *iterables):
        for args in zip(*iterables):
            out = fn(*args)
            progress[index] += 1  # noqa: F821 (deleted only after the last batch)
            yield out

    conn.send(("ready", os.getpid(), "", ""))
    try:
        while True:
            if not conn.poll(0.5):
                if not parent_alive():
                    return
                continue
            task = conn.recv()
            if task is None:
                return
            seq, slot, ids, seed, epoch, train = task
            images, labels = slots[slot]
            found.clear()
            try:
                source.decode_into(ids, seed=seed, epoch=epoch, train=train,
                                   images=images[:len(ids)], labels=labels[:len(ids)],
                                   map_fn=serial_map)
            except BaseException as e:  # noqa: BLE001
                if isinstance(e, BadDataError):  # the data's fault, said in one line
                    conn.send(("failed", seq, "BadDataError", str(e)))
                else:
                    conn.send(("failed", seq, type(e).__name__, traceback.format_exc()))
                return
            conn.send(("done", seq, list(found), ""))
    except (EOFError, ConnectionError, KeyboardInterrupt):  # the training process is gone
        return
    finally:
        del progress, slots, images, labels
        source.close()
        shm.close()


def _shutdown(procs, conns, shm) -> None:
    """Stops the workers (politely, then by force) and frees the shared memory."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for conn in conns:
        conn.close()
    try:
        shm.close()
    except BufferError:  # views still held by the iterator at interpreter exit
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class WorkerTrainIterator(TrainIterator):
    """``TrainIterator`` whose batches ``decode_workers`` processes decode (module doc).

    Extra args:
      decode_workers: number of worker processes (>= 1).
      slots: batches decoded ahead of the consumer (default ``2 * decode_workers``).
      stall_timeout: seconds without a finished image after which the worker that owes
        the next batch is declared hung.
      start_timeout: seconds a worker may take to start and open the data.
    """

    _train = True  # the transform the workers apply: train's (WorkerEvalIterator: eval's)

    def __init__(self, source, *, decode_workers: int, slots: int | None = None,
                 stall_timeout: float = 30.0, start_timeout: float = 120.0, **kwargs):
        super().__init__(source, **kwargs)
        checks.integer("decode_workers", decode_workers)
        slots = checks.integer("slots", 2 * decode_workers if slots is None else slots)
        if not hasattr(source, "worker_opener"):
            raise ValueError(f"{type(source).__name__} cannot be decoded in worker processes "
                             "(it has no worker_opener); use decode_workers=0")
        opener, options = source.worker_opener()
        self._layout = _Layout(decode_workers, slots, self.local_batch_size, source.image_shape)
        self.stall_timeout, self.start_timeout = float(stall_timeout), float(start_timeout)
        self._shm = _create_ring(self._layout)
        self._progress, self._slots = self._layout.views(self._shm.buf)
        self._progress[:] = 0
        ctx = _context()
        self._procs: list = []
        self._conns: list = []
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._shm)
        for i in range(decode_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"decode_worker_{i}", daemon=True,
                               args=(i, opener, options, self._shm.name, self._layout, child,
                                     os.getpid()))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self.pids = [p.pid for p in self._procs]
        self._free = collections.deque(range(slots))
        self._pending: dict[int, tuple[int, int, int, int]] = {}  # seq -> worker, slot, epoch, step
        self._done: dict[int, tuple] = {}
        self._ready: set[int] = set()
        self._seq_out = self._seq_in = 0
        self._ahead = self.position
        try:
            self._await_ready()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- messages
    def _name(self, w: int) -> str:
        return f"decode worker {w} (pid {self._procs[w].pid})"

    def _fail(self, message: str, error=DecodeWorkerError):
        self.close()
        raise error(message)

    def _receive(self, timeout: float) -> None:
        """Takes in the messages that arrive within ``timeout``; a dead worker raises."""
        sentinels = {p.sentinel: w for w, p in enumerate(self._procs)}
        ready = multiprocessing.connection.wait(self._conns + list(sentinels), timeout)
        for obj in ready:
            if obj in sentinels:
                continue
            w = self._conns.index(obj)
            try:
                kind, seq, a, b = self._conns[w].recv()
            except (EOFError, OSError):
                continue  # it exited: its sentinel says how
            if kind == "failed":
                if a == "BadDataError":
                    self._fail(b, BadDataError)
                where = "" if seq is None else " on " + self._where(seq)
                self._fail(f"{self._name(w)} failed{where}:\n{b}")
            if kind == "ready":
                self._ready.add(w)
            else:
                self._done[seq] = (kind, w, a)
        for obj in ready:
            if obj in sentinels:  # a worker exited while it was still needed
                w = sentinels[obj]
                self._procs[w].join(0.1)
                self._ended(w, "ended")

    def _ended(self, w: int, otherwise: str) -> None:
        """Fail with how worker ``w`` ended: its exit code or signal (``otherwise`` while
        the process has not ended yet)."""
        code = self._procs[w].exitcode
        how = (otherwise if code is None else f"was killed by signal {-code}" if code < 0
               else f"exited with code {code}")
        after = f"(after {self._progress[w]} images)"
        if code == -signal.SIGBUS:  # what touching a page of a full tmpfs gets
            self._fail(f"{self._name(w)} {how} (SIGBUS): /dev/shm is probably full {after}; "
                       "free it or enlarge it (Docker: --shm-size), or use fewer "
                       "--decode-workers")
        self._fail(f"{self._name(w)} {how} {after}; the input pipeline cannot continue")

    def _where(self, seq: int) -> str:
        if seq not in self._pending:
            return f"batch {seq}"
        _, _, epoch, step = self._pending[seq]
        return f"the batch of epoch {epoch}, step {step}"

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while len(self._ready) < len(self._procs):
            self._receive(0.2)
            if time.monotonic() > deadline:
                late = sorted(set(range(len(self._procs))) - self._ready)
                self._fail(f"decode workers {late} did not start within {self.start_timeout:g} s")

    # ---------------------------------------------------------------- the stream
    def _dispatch(self) -> None:
        while self._free and self._more(self._ahead):
            epoch, step = self._ahead.epoch, self._ahead.step
            ids = self._ids(epoch)[step]
            slot, w = self._free.popleft(), self._seq_in % len(self._procs)
            try:
                self._conns[w].send((self._seq_in, slot, ids, self.seed, epoch, self._train))
            except (OSError, ValueError):
                # Its end of the pipe is closed: it is exiting. Its exit status says how,
                # once the process has ended (a loaded machine may take a moment).
                self._procs[w].join(5.0)
                self._ended(w, "does not take work (its pipe is closed)")
            self._pending[self._seq_in] = (w, slot, epoch, step)
            self._seq_in += 1
            step += 1
            if step == self.steps_per_epoch:
                epoch, step = epoch + 1, 0
            self._ahead = Position(epoch=epoch, step=step)

    @staticmethod
    def _more(position: Position) -> bool:
        """Whether the batch at ``position`` exists (training: always)."""
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finalizer is None or not self._finalizer.alive:
            raise DecodeWorkerError("the decode workers were stopped (close() was called)")
        self._dispatch()
        seq = self._seq_out
        w, slot, _, _ = self._pending[seq]  # the batch at self._position
        seen, since = int(self._progress[w]), time.monotonic()
        while seq not in self._done:
            self._receive(0.1)
            now, count = time.monotonic(), int(self._progress[w])
            if count != seen:
                seen, since = count, now
            elif now - since > self.stall_timeout:
                self._fail(f"{self._name(w)} hangs: no image finished in {self.stall_timeout:g} s "
                           f"while it owes {self._where(seq)}")
        _, _, found = self._done.pop(seq)
        images, labels = self._slots[slot]
        batch = {"image": images.copy(), "label": labels.copy()}
        del self._pending[seq]
        self._free.append(slot)
        self._seq_out += 1
        try:
            for i, name, error, shard in found:
                self.source.note_bad(i, name, error, shard)  # type: ignore[attr-defined]
        except BadDataError:
            self.close()
            raise
        self._advance()
        return batch

    def close(self) -> None:
        """Stops the workers and frees the shared memory (idempotent)."""
        if self._finalizer is not None and self._finalizer.alive:
            self._progress = self._slots = None
            self._finalizer()


class WorkerEvalIterator(WorkerTrainIterator):
    """``pipeline.eval_batches`` decoded by ``decode_workers`` processes: the same padded
    batches and masks (every example once over all processes), one pass, then
    ``StopIteration``; the same ring, failure reports and shutdown as training's.
    ``close()`` it (it also closes itself at the end of the pass)."""

    _train = False

    def __init__(self, source, *, global_batch_size: int, decode_workers: int,
                 process_index: int = 0, process_count: int = 1, **kwargs):
        self._eval_ids, self._eval_mask = eval_indices(
            source.num_examples, global_batch_size=global_batch_size,
            process_index=process_index, process_count=process_count)
        slots = kwargs.pop("slots", None) or min(2 * decode_workers, len(self._eval_ids))
        super().__init__(source, decode_workers=decode_workers, slots=slots,
                         global_batch_size=global_batch_size, seed=0,
                         process_index=process_index, process_count=process_count, **kwargs)

    @staticmethod
    def _epoch_steps(num_examples: int, global_batch_size: int) -> int:
        return num_eval_batches(num_examples, global_batch_size)

    def _ids(self, epoch: int) -> np.ndarray:
        return self._eval_ids

    @staticmethod
    def _more(position: Position) -> bool:
        return position.epoch == 0  # one pass

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position.epoch > 0:
            self.close()
            raise StopIteration
        step = self._position.step
        batch = super().__next__()
        batch["mask"] = self._eval_mask[step].astype(np.float32)
        return batch
