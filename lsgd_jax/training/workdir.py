"""One run per workdir: an exclusive lock held by process 0 for the run's lifetime.

Two runs on one workdir destroy each other's work (the second one's start-up
cleanup removes the first one's save in progress). ``WORKDIR/.lock`` is created
with ``O_CREAT | O_EXCL``, which is atomic on local and NFS file systems alike,
and holds the holder's host, pid, start time, the start time of its process and a
random token. A background thread touches it every ``HEARTBEAT_S`` seconds.

A lock is stale, and is taken over, when

* its holder is on this host and its pid is gone, is this very process, or is a
  process started after the lock (a pid reused, as after a container restart,
  where the restarted entrypoint often gets the same pid);
* its heartbeat is older than ``STALE_S`` (a holder on another host that died);
* it cannot be parsed and is older than ``UNREADABLE_STALE_S`` (a crash between
  creating the file and writing it).

A holder can lose its lock (frozen for longer than ``STALE_S``, then taken over):
:meth:`WorkdirLock.check` tells it so before each save and each record, and the
run stops without writing anything more.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
import uuid

from lsgd_jax.base.host import pid_alive, process_start_time

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
UNREADABLE_STALE_S = 5.0

# Tokens of the locks this process holds now: a lock naming this process's pid is
# live only if its token is one of these (else an earlier process had the same pid).
_HELD_HERE: set[str] = set()


class WorkdirError(ValueError):
    """The workdir cannot be used: in use by another run, not a directory, not writable."""


class LockLostError(WorkdirError):
    """Another run took the workdir's lock over from this one: stop, write nothing more."""


def _describe(holder: dict) -> str:
    if "host" not in holder:
        age = time.time() - holder.get("heartbeat", time.time())
        return f"an unreadable lock file, last written {age:.0f} s ago"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {started}"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock; a second holder is refused.

    Raises:
      WorkdirError: naming the holder (host, pid, start) and the lock file, or the
        reason the workdir cannot be used (a file, not writable).
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                    "process_started": process_start_time(os.getpid()),
                    "token": uuid.uuid4().hex}
        self.lost = ""  # why the lock is no longer this run's, once it is not

    # ------------------------------------------------------------------ checks
    def _prepare(self) -> None:
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise WorkdirError(f"--workdir {self.workdir} is an existing file; give a directory "
                               "(it is created if missing)")
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"cannot create --workdir {self.workdir} ({e.strerror}); choose a "
                               "writable place") from None
        probe = os.path.join(self.workdir, f".write-test-{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise WorkdirError(f"cannot write in --workdir {self.workdir} ({e.strerror}); "
                               "choose a writable directory") from None

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            if not isinstance(holder, dict) or "host" not in holder:
                raise ValueError("not a lock record")
            holder["heartbeat"] = os.stat(self.path).st_mtime
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Being written right now, or garbage: judge it by its age alone.
            try:
                return {"heartbeat": os.stat(self.path).st_mtime}
            except FileNotFoundError:
                return None

    def _stale(self, holder: dict) -> str:
        """Why ``holder``'s lock is stale, or "" when it is live."""
        age = time.time() - holder.get("heartbeat", 0)
        if "host" not in holder:
            return "unreadable and not written for a while" if age > UNREADABLE_STALE_S else ""
        pid = holder.get("pid")
        if holder.get("host") == self._me["host"] and isinstance(pid, int):
            if pid == self._me["pid"]:
                if holder.get("token") in _HELD_HERE:
                    return ""
                return "it names this very process (left by an earlier run whose pid it got)"
            if not pid_alive(pid):
                return "its process is gone"
            started = process_start_time(pid)
            saved = holder.get("process_started")
            if started is not None and isinstance(saved, (int, float)):
                if abs(started - saved) > 2.0:  # /proc's boot time is whole seconds
                    return f"pid {pid} is now another process"
            elif started is not None and started > holder.get("started", 0) + 2.0:
                return f"pid {pid} is now a process started after the lock"
            return ""
        return "its heartbeat stopped" if age > self.stale_s else ""

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> str:
        """Take the lock; returns a note when a stale lock was taken over, else ""."""
        self._prepare()
        note = ""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                why = self._stale(holder)
                if not why:
                    raise WorkdirError(
                        f"--workdir {self.workdir} is in use by another run ({_describe(holder)}; "
                        f"lock file {self.path}). Wait for it or stop it; if that process is "
                        "gone for good, delete the lock file.") from None
                # Move the stale lock aside atomically, so two takers cannot both win.
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                    os.remove(aside)
                except FileNotFoundError:
                    pass
                note = f"took over a stale lock ({_describe(holder)}: {why})"
                continue
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise WorkdirError(f"cannot write in --workdir {self.workdir} ({e.strerror})"
                                       "; choose a writable directory") from None
                raise
            with os.fdopen(fd, "w") as f:
                json.dump(self._me, f)
            _HELD_HERE.add(self._me["token"])
            self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
            self._thread.start()
            return note
        raise WorkdirError(f"could not take the lock {self.path}; another run keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.lost_reason():  # never keep another run's lock fresh
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _mine(self, holder: dict | None) -> bool:
        return bool(holder) and all(holder.get(k) == self._me[k] for k in ("host", "pid", "token"))

    def lost_reason(self) -> str:
        """Why this lock is no longer this run's ("" while it is), read from the file."""
        if not self.lost:
            holder = self._holder()
            if not self._mine(holder):
                whose = (f"it is now held by another run ({_describe(holder)})" if holder
                         else "the lock file is gone")
                self.lost = (f"this run no longer holds the lock of --workdir {self.workdir}: "
                             f"{whose}. Stopping without writing anything more; the run that "
                             "holds it now owns the workdir")
        return self.lost

    def check(self) -> None:
        """Raise LockLostError unless the lock is still this run's (before every write)."""
        if self.lost_reason():
            raise LockLostError(self.lost)

    def release(self) -> None:
        _HELD_HERE.discard(self._me["token"])
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._mine(self._holder()):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free_space(workdir: str, state_bytes: int) -> str:
    """An error message when the workdir cannot hold one more checkpoint of a state of
    ``state_bytes``, else ""."""
    need = int(state_bytes * 1.1) + (1 << 20)  # orbax's metadata and file-system blocks
    leftovers = 0  # unfinished saves of an earlier run are removed before the next save
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if "orbax-checkpoint-tmp" in name:
                for root, _, files in os.walk(os.path.join(ckpt_dir, name)):
                    leftovers += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    free = shutil.disk_usage(workdir).free + leftovers
    if free >= need:
        return ""
    return (f"not enough free space for a checkpoint in --workdir {workdir}: "
            f"{free / 2**20:.1f} MiB free, a checkpoint needs about {need / 2**20:.1f} MiB. "
            "Free some space (the run resumes from its latest complete checkpoint) or choose "
            "another --workdir")
