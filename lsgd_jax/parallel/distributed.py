"""Processes, the device mesh, and host data to global arrays.

One 1-D mesh with axis ``"data"`` spans every device of every process; each
device is one or more of the paper's workers (section 3). Parameters and
optimizer state are replicated over it, batches are split along it.

Multi-process start goes through ``jax.distributed.initialize``: cluster
detection on SLURM and Open MPI, explicit coordinator / process count /
process id otherwise, and Gloo collectives when the devices are CPUs. Each
process then feeds its own share of the global batch, assembled with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lsgd_jax.base.checks as checks

DATA_AXIS = "data"
CPU_COLLECTIVES = ("gloo", "mpi")


def _cluster_size_from_env() -> int:
    """Number of processes announced by SLURM or Open MPI (1 if neither)."""
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    if "SLURM_JOB_ID" in os.environ:
        for key in ("SLURM_NTASKS", "SLURM_NPROCS"):
            if key in os.environ:
                return int(os.environ[key])
    return 1


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 300,
) -> bool:
    """Start the multi-process runtime if there is more than one process.

    With no arguments, SLURM (``SLURM_NTASKS`` > 1) or Open MPI
    (``OMPI_COMM_WORLD_SIZE`` > 1) is detected by ``jax.distributed`` itself;
    without such a cluster this is a no-op. With explicit arguments all three
    are needed, except that ``num_processes=1`` is a no-op. Must run before
    anything else touches JAX devices.

    Args:
      coordinator_address: "host:port" of process 0.
      num_processes: total number of processes.
      process_id: this process, in [0, num_processes).
      cpu_collectives: collectives between CPU processes, "gloo" or "mpi"
        (None leaves JAX's default, which has none).
      local_device_ids: devices this process drives (None: all visible).
      initialization_timeout: seconds to wait for every process.
      heartbeat_timeout: seconds without a heartbeat after which the coordinator
        declares a process dead and stops the others (JAX's default: 100).
      shutdown_timeout: seconds to wait for every process at shutdown.

    Returns:
      True if the runtime is (now) multi-process, False for a single process.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(
            f"cpu_collectives must be one of {CPU_COLLECTIVES} or None, got {cpu_collectives!r}"
        )
    if any(given):
        if num_processes == 1 and process_id in (None, 0):
            return False
        if not all(given):
            raise ValueError(
                "give all of coordinator_address, num_processes and process_id, or none "
                f"(got coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes!r}, process_id={process_id!r})"
            )
        checks.integer("num_processes", num_processes)
        checks.integer("process_id", process_id, low=0, high=num_processes)
    elif _cluster_size_from_env() <= 1:
        return False

    if jax.distributed.is_initialized():
        return True
    if coordinator_address is not None:
        check_coordinator(coordinator_address, process_id, num_processes,
                          timeout=initialization_timeout)
    # Newer JAX releases may drop the option (Gloo being their default).
    if cpu_collectives is not None and "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    return True


def check_coordinator(address: str, process_id: int, num_processes: int, *,
                      timeout: float = 300, retry_every: float = 1.0) -> None:
    """Raise ``ValueError`` naming ``--coordinator-address`` when a multi-process start
    cannot work, before ``jax.distributed`` tries: it aborts the whole process (SIGABRT
    and a C++ stack, no Python exception) when the coordinator is out of reach.

    Process 0 serves the coordinator on ``address``'s port of every interface: that
    port must be free here. Every other process must reach ``address`` within
    ``timeout`` seconds (process 0 may start later: it is tried again every
    ``retry_every`` seconds); the connection is closed at once.
    """
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator-address must be HOST:PORT with a port in 1..65535, "
                         f"got {address!r}")
    if process_id == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", int(port)))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise ValueError(
                    f"--coordinator-address {address}: port {port} is already in use on this "
                    "host, where process 0 serves the coordinator; pick a free port (the same "
                    "for every process), or stop what holds it") from None
        return
    deadline, last = time.monotonic() + timeout, None
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, left))).close()
            return
        except OSError as e:
            last = e
        if left <= 0:
            why = getattr(last, "strerror", None) or str(last) or type(last).__name__
            raise ValueError(
                f"process {process_id} of {num_processes} could not reach the coordinator at "
                f"--coordinator-address {address} within {timeout:g} s ({why}); start "
                "process 0 with the same address, and check the host, the port and that no "
                "firewall is in between")
        time.sleep(max(0.0, min(retry_every, deadline - time.monotonic())))


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every process).

    Devices are ordered by (process, id), so each process owns one contiguous
    block of the batch axis, the layout that
    ``jax.make_array_from_process_local_data`` fills from local data.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def local_device_count(mesh: Mesh) -> int:
    """Devices of ``mesh`` that this process drives."""
    me = jax.process_index()
    return sum(1 for d in mesh.devices.flat if d.process_index == me)


def host_to_global(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble each process's share of a batch into global arrays over ``"data"``.

    Every process calls this with its own rows (the same number on every
    process); the result's leading axis is the concatenation over processes,
    in process order.

    Args:
      local_batch: a pytree of arrays, leading axis = this process's rows.
      mesh: the mesh from :func:`make_mesh`.

    Returns:
      The same pytree of ``jax.Array`` sharded with :func:`data_sharding`.
    """
    sharding = data_sharding(mesh)
    local = local_device_count(mesh)

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(
                f"host_to_global: local batch of shape {x.shape} cannot be split over "
                f"this process's {local} devices; the leading axis must be a multiple of {local}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_batch)


def shard_map(f: Callable, *, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """``jax.shard_map`` (or the experimental one on older JAX), without the replication check.

    The check is off so that gradients of replicated parameters stay
    per-device inside ``f`` (with it on, JAX sums them implicitly) and the
    engine's explicit all-reduce (``psum`` or the paper's algorithms) does the
    sum exactly once.
    """
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


class InFlight:
    """Bounds the programs in flight: each new one waits for the one ``depth - 1`` before it.

    Why it exists: on CPU devices, XLA runs each device's share of a collective
    program on a shared thread pool, and an all-reduce aborts the process when
    its participants miss the rendezvous deadline (40 s). A loop that dispatches
    hundreds of collective programs without waiting queues them all at once, and
    on a 2-core host some participants starve past that deadline
    (``rendezvous.cc: Termination timeout for all reduce``). Waiting for step t−1
    while step t runs keeps the queue at two programs and the device busy: on a
    GPU, dispatching one step ahead already hides the host's latency.

    Usage::

        inflight = InFlight(depth=2)
        for batch in batches:
            state, metrics = step(state, batch)
            inflight.push(metrics)   # never the donated state: it is deleted by the next step
        inflight.drain()

    Args:
      depth: most programs in flight, the one just dispatched included (2: step
        t runs while the host waits for step t−1; 1: wait for each at once).
    """

    def __init__(self, depth: int = 2):
        checks.integer("depth", depth)
        self.depth = depth
        self._queue: collections.deque = collections.deque()

    def push(self, outputs: Any) -> Any:
        """Track ``outputs`` of a program just dispatched; wait while too many are in flight."""
        self._queue.append(outputs)
        while len(self._queue) > self.depth - 1:
            jax.block_until_ready(self._queue.popleft())
        return outputs

    def drain(self) -> None:
        """Wait for everything pushed so far."""
        while self._queue:
            jax.block_until_ready(self._queue.popleft())


def cpu_device_env(num_devices: int, env=None) -> dict:
    """``env`` (default: this process's) with JAX on ``num_devices`` fake CPU devices.

    Read when JAX starts its backends: set it before the first use of a device, or
    pass it to a child process. The one place the project spells this setting.
    """
    env = dict(os.environ if env is None else env)
    env["JAX_PLATFORMS"] = "cpu"
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag + "=")]
    env["XLA_FLAGS"] = " ".join(kept + [f"{flag}={num_devices}"])
    return env


def use_cpu_devices(num_devices: int) -> None:
    """Run this process's JAX on ``num_devices`` fake CPU devices (see ``cpu_device_env``)."""
    os.environ.update(cpu_device_env(num_devices))
