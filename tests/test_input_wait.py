"""The share of training time spent waiting for data: measured by the prefetcher, logged
and recorded (metrics.jsonl, TensorBoard) by the training loop's log window."""

import glob
import json
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsgd_jax.parallel.prefetch import prefetch_to_mesh
from lsgd_jax.training.metrics import MetricsWriter
from lsgd_jax.training.recording import LogWindow


@pytest.fixture(scope="module")
def sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))


def batches(delay):
    for k in range(6):
        time.sleep(delay)
        yield {"x": np.full(8, k, np.int32)}


def test_prefetcher_adds_up_the_time_next_waited(sharding):
    # A slow producer: every batch after the queue drains costs its 0.15 s of production.
    with prefetch_to_mesh(batches(0.15), sharding, size=1) as slow:
        next(slow)
        start = slow.wait_seconds
        for _ in range(4):
            next(slow)
        assert slow.wait_seconds - start >= 4 * 0.15 * 0.8  # sleep is a lower bound
    # A slow consumer: the batches are ready when asked for.
    with prefetch_to_mesh(batches(0.0), sharding, size=2) as fast:
        next(fast)
        start = fast.wait_seconds
        for _ in range(3):
            time.sleep(0.3)
            next(fast)
        assert fast.wait_seconds - start < 0.2


def test_log_window_logs_and_records_the_share_of_each_window(tmp_path):
    lines = []
    plan = SimpleNamespace(global_batch_size=8, total_steps=100, steps_per_epoch=10)
    run = SimpleNamespace(plan=plan, schedule=lambda step: 0.1, log=lines.append)
    writer = MetricsWriter(str(tmp_path))
    window = LogWindow(run, writer, 0)
    waited = [5.0]  # seconds waited before the window: not part of it
    window.input_wait = lambda: waited[0]
    window.restart(1, time.time())
    metrics = {"loss": 1.0, "top1_error": 0.5, "finite": True}
    for step, wait in ((11, 0.76), (21, 0.04)):
        window.add(step, metrics)
        window.t_window = time.time() - 2.0  # a 2-second window
        waited[0] += wait
        window.emit(step)
    writer.close()
    assert "input-bound: 38 % of the time waiting for data" in lines[0]
    assert "| 2 % of the time waiting for data" in lines[1] and "input-bound" not in lines[1]
    with open(tmp_path / "metrics.jsonl") as f:
        shares = [r["input_wait_fraction"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert shares == pytest.approx([0.38, 0.02], abs=0.005)  # tolerance: the window's clock
    events = glob.glob(str(tmp_path / "tensorboard" / "events.*"))
    assert events and b"train/input_wait_fraction" in open(events[0], "rb").read()
