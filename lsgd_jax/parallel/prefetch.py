"""Device prefetch: global ``jax.Array`` batches assembled ahead of the train step.

A background thread takes local batches from an iterator, turns them into global
arrays with ``jax.make_array_from_process_local_data`` (each process contributes its
slice of the global batch) and keeps up to ``size`` of them in a queue, so the host
to device copy and the decoding of the next batch overlap the current step.

``wait_seconds`` adds up the time the consumer spent blocked in ``next()`` for a batch
that was not ready yet: over a stretch of training, its share of the wall time is the
share in which the devices (or the loop) waited for the input pipeline.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

import jax

import lsgd_jax.base.checks as checks

_END = object()


def prefetch_to_mesh(iterator: Iterator[Any], sharding: Any, size: int = 2) -> "DevicePrefetcher":
    """Iterates over global arrays built from ``iterator``'s local batches.

    Args:
      iterator: yields dicts (or any pytree) of process-local numpy arrays whose
        leading axis is this process's share of the global batch.
      sharding: a ``jax.sharding.Sharding`` used for every leaf (typically
        ``NamedSharding(mesh, PartitionSpec("data"))``), or a pytree of shardings
        with the structure of a batch.
      size: number of batches held ready ahead of the consumer (>= 1).

    An exception raised by ``iterator`` (or by the transfer) is re-raised by the
    ``next()`` that would have returned that batch. ``close()`` (or leaving a
    ``with`` block) stops the thread. ``position`` is the position of the next batch
    this object returns (when ``iterator`` has one), which is what a checkpoint must
    save, since the underlying iterator runs ahead.
    """
    return DevicePrefetcher(iterator, sharding, size)


class DevicePrefetcher:
    """A background thread feeding a queue of global batches (see ``prefetch_to_mesh``)."""

    def __init__(self, iterator: Iterator[Any], sharding: Any, size: int = 2):
        checks.integer("prefetch size", size)
        self._iterator = iterator
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._position = getattr(iterator, "position", None)
        self.wait_seconds = 0.0  # cumulative time next() waited for a batch (module doc)
        self._thread = threading.Thread(target=self._produce, daemon=True, name="prefetch_to_mesh")
        self._thread.start()

    @property
    def position(self):
        return self._position

    def _to_global(self, local):
        if isinstance(self._sharding, jax.sharding.Sharding):
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._sharding, x), local
            )
        return jax.tree.map(jax.make_array_from_process_local_data, self._sharding, local)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for local in self._iterator:
                if self._stop.is_set():
                    return
                position = getattr(self._iterator, "position", None)
                if not self._put((self._to_global(local), position, None)):
                    return
            self._put((_END, None, None))
        except BaseException as e:  # noqa: BLE001 (handed over to the consumer)
            self._put((None, None, e))

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        t = time.perf_counter()
        batch, position, error = self._queue.get()
        self.wait_seconds += time.perf_counter() - t
        if error is not None:
            self._done = True
            self.close()
            raise error
        if batch is _END:
            self._done = True
            self.close()
            raise StopIteration
        self._position = position
        return batch

    def close(self) -> None:
        """Stops the producer thread and drops the batches it prepared."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
