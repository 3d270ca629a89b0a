"""One run per workdir: the lock, its stale takeover, and workdirs that cannot be used."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import write_lock

from lsgd_jax.training.workdir import LOCK_NAME, LockLostError, WorkdirError, WorkdirLock


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


# ---------------------------------------------------------------- 5. the lock
def test_a_lock_naming_this_very_process_is_stale(tmp_path):
    """A restarted container's entrypoint often gets the pid of the run that left the lock."""
    write_lock(tmp_path / LOCK_NAME, pid=os.getpid(), started=time.time() - 3600,
                token="from-before-the-restart")
    lock = WorkdirLock(str(tmp_path))
    assert "names this very process" in lock.acquire()
    lock.release()


def test_a_lock_whose_pid_is_now_a_younger_process_is_stale(tmp_path):
    younger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        # Written by "pid N" an hour ago; pid N is now a process that started just now.
        write_lock(tmp_path / LOCK_NAME, pid=younger.pid, started=time.time() - 3600)
        lock = WorkdirLock(str(tmp_path))
        assert "is now a process started after the lock" in lock.acquire()
        lock.release()
        # With the holder's own start time recorded, any other start time is reuse.
        write_lock(tmp_path / LOCK_NAME, pid=younger.pid, process_started=time.time() - 3600)
        lock = WorkdirLock(str(tmp_path))
        assert "is now another process" in lock.acquire()
        lock.release()
        # A lock that this very process holds (its start time matches) is live.
        from lsgd_jax.base.host import process_start_time

        write_lock(tmp_path / LOCK_NAME, pid=younger.pid,
                    process_started=process_start_time(younger.pid))
        with pytest.raises(WorkdirError, match=f"in use by another run .host [^,]+, pid "
                                               f"{younger.pid},"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        younger.kill()
        younger.wait()


def test_an_unreadable_lock_is_stale_after_a_few_seconds(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(WorkdirError, match="an unreadable lock file, last written 0 s ago"):
        WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 30
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = WorkdirLock(str(tmp_path))
    assert "unreadable" in lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_taken_over_is_noticed_and_never_kept_fresh(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    try:
        lock.check()  # still ours
        old = time.time() - 1000
        write_lock(tmp_path / LOCK_NAME, host="elsewhere", pid=7, token="theirs")
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert abs(os.stat(tmp_path / LOCK_NAME).st_mtime - old) < 1
        with pytest.raises(LockLostError, match="now held by another run .host elsewhere, pid 7"):
            lock.check()
    finally:
        lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # the new holder's lock is left alone
