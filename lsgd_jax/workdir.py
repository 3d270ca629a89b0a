"""One run per workdir: an exclusive lock held by process 0 for the run's lifetime.

Two runs on one workdir destroy each other's work (the second one's start-up
cleanup removes the first one's save in progress). ``WORKDIR/.lock`` is created
with ``O_CREAT | O_EXCL``, which is atomic on local and NFS file systems alike,
and holds the holder's host, pid and start time. A background thread touches it
every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when its
holder is on this host and its pid is gone, or when its heartbeat is older than
``STALE_S`` (a holder on another host that died).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class WorkdirError(ValueError):
    """The workdir cannot be used: in use by another run, not a directory, not writable."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
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
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

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

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return time.time() - holder.get("heartbeat", 0) > self.stale_s

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
                if not self._stale(holder):
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
                note = f"took over a stale lock ({_describe(holder)})"
                continue
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise WorkdirError(f"cannot write in --workdir {self.workdir} ({e.strerror})"
                                       "; choose a writable directory") from None
                raise
            with os.fdopen(fd, "w") as f:
                json.dump(self._me, f)
            self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
            self._thread.start()
            return note
        raise WorkdirError(f"could not take the lock {self.path}; another run keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._holder()
        if holder and holder.get("pid") == self._me["pid"] and holder.get("host") == self._me["host"]:
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
