"""One run per workdir: the lock, its stale takeover, and workdirs that cannot be used."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lsgd_jax.training.workdir import LOCK_NAME, WorkdirError, WorkdirLock


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirError) as err:
            WorkdirLock(str(tmp_path)).acquire()
        text = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in text
        assert str(tmp_path / LOCK_NAME) in text
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with WorkdirLock(str(tmp_path)):  # and free again
        pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": time.time()}))
    lock = WorkdirLock(str(tmp_path))
    assert f"took over a stale lock (host {socket.gethostname()}, pid {dead}" in lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "started": time.time()}))
    with pytest.raises(WorkdirError, match="host elsewhere, pid 1"):
        WorkdirLock(str(tmp_path), stale_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = WorkdirLock(str(tmp_path), stale_s=60)
    assert "took over a stale lock (host elsewhere" in lock.acquire()
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(tmp_path / LOCK_NAME).st_mtime < 5
    finally:
        lock.release()


def test_a_file_is_not_a_workdir(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(WorkdirError, match=f"--workdir {path} is an existing file"):
        WorkdirLock(str(path)).acquire()
    assert path.read_text() == "x"


def test_a_workdir_that_cannot_be_written_is_refused_at_once():
    # /proc refuses new files even to root (a read-only mount behaves the same way).
    with pytest.raises(WorkdirError, match="cannot (create|write in) --workdir /proc/"):
        WorkdirLock("/proc/lsgd_jax_workdir").acquire()
