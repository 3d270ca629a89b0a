"""Mesh, shardings, host data to global arrays, and the distributed start (one process)."""

import jax
import numpy as np
import pytest
from helpers import free_port
from jax.sharding import PartitionSpec as P

from lsgd_jax.parallel.distributed import (
    data_sharding,
    host_to_global,
    initialize_distributed,
    make_mesh,
    replicated_sharding,
    shard_map,
)


def test_mesh_spans_all_devices_on_one_data_axis():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.shape == (8,)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert data_sharding(mesh).spec == P("data")
    assert replicated_sharding(mesh).spec == P()


def test_mesh_over_a_subset_and_rejects_empty():
    mesh = make_mesh(jax.devices()[:2][::-1])
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices()[:2])
    with pytest.raises(ValueError, match="at least one device"):
        make_mesh([])


def test_host_to_global_splits_rows_over_devices():
    mesh = make_mesh()
    local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "label": np.arange(16, dtype=np.int32)}
    batch = host_to_global(local, mesh)
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    assert batch["label"].sharding.is_equivalent_to(data_sharding(mesh), 1)
    # Device i holds rows [2i, 2i + 2): contiguous blocks in mesh order.
    for shard in batch["label"].addressable_shards:
        i = list(mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), [2 * i, 2 * i + 1])


def test_host_to_global_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of 8"):
        host_to_global({"x": np.zeros((12, 2))}, make_mesh())


def test_shard_map_gradients_stay_per_device():
    # The engine relies on shard_map leaving the gradient of a replicated
    # parameter un-summed, so that its explicit all-reduce sums exactly once.
    mesh = make_mesh()
    w = np.ones(3, np.float32)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)

    def per_device(w, x):
        return jax.grad(lambda w: (w[None, :] * x).sum())(w)[None]

    g = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=P("data")))(w, x)
    np.testing.assert_array_equal(np.asarray(g).reshape(8, 3), x)


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
    assert initialize_distributed("127.0.0.1:1234", 1, 0) is False
    # A single-task SLURM job is a single process too.
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize_distributed() is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("127.0.0.1:1234", 2, None), {}, "give all of"),
        (("127.0.0.1:1234", 2, 2), {}, r"process_id must be an integer in \[0, 2\)"),
        (("127.0.0.1:1234", 0, 0), {}, "num_processes must be a positive integer"),
        ((), {"cpu_collectives": "nccl"}, "cpu_collectives must be one of"),
    ],
)
def test_initialize_distributed_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        initialize_distributed(*args, **kwargs)


def test_cpu_device_env_replaces_an_earlier_device_count():
    from lsgd_jax.parallel.distributed import cpu_device_env

    env = cpu_device_env(2, {"XLA_FLAGS": "--xla_dump_to=/tmp/x "
                                          "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x "
                                "--xla_force_host_platform_device_count=2")
    assert env["JAX_PLATFORMS"] == "cpu"
    assert cpu_device_env(4, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


# --- the coordinator, checked before jax.distributed (which aborts the process) ---

@pytest.mark.parametrize("address", ["localhost", "localhost:", ":1234", "host:99999",
                                     "host:http"])
def test_coordinator_address_must_be_host_port(address):
    from lsgd_jax.parallel.distributed import check_coordinator

    with pytest.raises(ValueError, match=f"--coordinator-address must be HOST:PORT.*{address!r}"):
        check_coordinator(address, 1, 2, timeout=0.1)


def test_process_0_needs_its_coordinator_port_free():
    import socket

    from lsgd_jax.parallel.distributed import check_coordinator

    port = free_port()
    check_coordinator(f"127.0.0.1:{port}", 0, 2, timeout=0.1)  # free: nothing to say
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        with pytest.raises(ValueError, match=f"--coordinator-address 127.0.0.1:{port}: port "
                                             f"{port} is already in use"):
            check_coordinator(f"127.0.0.1:{port}", 0, 2, timeout=0.1)


def test_other_processes_wait_for_the_coordinator_then_say_who_they_could_not_reach():
    import socket
    import threading
    import time

    from lsgd_jax.parallel.distributed import check_coordinator

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"process 1 of 2 could not reach the coordinator at "
                                         f"--coordinator-address 127.0.0.1:{port} within 0.6 s"):
        check_coordinator(f"127.0.0.1:{port}", 1, 2, timeout=0.6, retry_every=0.1)
    assert 0.6 <= time.monotonic() - t0 < 5  # tolerance: the 0.6 s deadline, then one try
    # Process 0 may come up later than the others: they keep trying until it does.
    server = socket.socket()
    server.bind(("127.0.0.1", port))

    def listen_late():
        time.sleep(0.5)
        server.listen()

    thread = threading.Thread(target=listen_late)
    thread.start()
    try:
        check_coordinator(f"127.0.0.1:{port}", 1, 2, timeout=10, retry_every=0.1)
    finally:
        thread.join()
        server.close()


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_unreachable_coordinator_is_one_line_and_status_2(tmp_path, command):
    """Without the check, JAX aborts (SIGABRT, status 134) with a C++ stack."""
    import os
    import subprocess
    import sys

    from lsgd_jax.parallel.distributed import cpu_device_env

    port = free_port()
    flags = {"train": ["--data", "fashion_mnist", "--model", "resnet8"], "evaluate": []}
    env = cpu_device_env(1)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "lsgd_jax", command, "--workdir", str(tmp_path / "w"),
         *flags[command], "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", "1", "--initialization-timeout", "1"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: process 1 of 2 could not reach the coordinator at "
                                f"--coordinator-address 127.0.0.1:{port} within 1 s"), lines
    assert "Check failure" not in proc.stderr


class _Store:
    """The coordination service's key-value store, as the agreement sees it, with the
    other process's posts made in advance."""

    def __init__(self, others: dict):
        self.keys = dict(others)
        self.deleted: list[str] = []

    def key_value_set(self, key, value):
        self.keys[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        return self.keys[key]

    def key_value_delete(self, key):
        self.deleted.append(key)
        del self.keys[key]


def test_agreement_on_two_processes_and_its_store_stays_small(monkeypatch):
    import json

    from jax._src import distributed

    from lsgd_jax.parallel import agreement

    # Process 0 of two; process 1's values are posted already.
    theirs = {"verdict": ["", "refuse"], "outcome": [2, 0, 1], "ok": [True, False]}
    store = _Store({f"lsgd_jax/agree/{name}/{call}/1": json.dumps(value)
                    for name, values in theirs.items()
                    for call, value in enumerate(values, start=1)})
    monkeypatch.setattr(distributed.global_state, "client", store)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(agreement, "_CALLS", agreement.collections.Counter())

    assert agreement.from_process_0("stop", "verdict") == "stop"  # process 0's, not 1's
    assert agreement.from_process_0("", "verdict") == ""
    assert agreement.worst(0, "outcome") == 2
    assert agreement.worst(1, "outcome") == 1
    assert agreement.worst(0, "outcome") == 1
    assert agreement.everywhere(True, "ok") is True
    assert agreement.everywhere(True, "ok") is False  # process 1 said no
    # Each name's own keys are removed two calls later, when every process has read them.
    assert store.deleted == ["lsgd_jax/agree/outcome/1/0"]
    assert "lsgd_jax/agree/outcome/3/0" in store.keys


def test_agreement_on_one_process_needs_no_runtime():
    from lsgd_jax.parallel import agreement

    assert agreement.exchange("anything", {"a": 1}) == [{"a": 1}]
    assert agreement.from_process_0("x") == "x"
    assert agreement.worst(3) == 3
    assert agreement.everywhere(False) is False
