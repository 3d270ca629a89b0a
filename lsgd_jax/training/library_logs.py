"""Library noise goes to a file in the workdir; the console gets our one-line errors.

When a save fails (a full disk), orbax logs tracebacks from its save threads and
tensorstore's callbacks print "Event loop is closed" tracebacks: hundreds of lines
around the one line that says what happened. Inside :func:`diverted`, the loggers of
orbax, absl, asyncio and tensorstore, and the uncaught tracebacks that pass only
through those libraries, go to one file (``WORKDIR/orbax.log``, one per process),
and the :class:`LibraryLog` it yields keeps the last error they logged, so that our
own error can quote it. A call on an event loop that orbax has already closed is
recorded and dropped, as it would have been after its traceback.

The library leaves the process as it found it: leaving :func:`diverted` puts back
every hook, logger and method it changed. Only the command line, which owns its
process, also calls :func:`quiet_exit`: the standard error is closed to what
tensorstore's threads still print while the interpreter shuts down, and calls on
closed loops stay dropped until then.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import logging
import os
import sys
import threading
import traceback
from typing import Iterator

# The loggers orbax (through absl), asyncio and tensorstore write to.
NOISY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")
# An uncaught exception whose traceback passes through these is library noise.
_NOISY_FILES = ("/orbax/", "/tensorstore/", "/asyncio/")


class LibraryLog(logging.FileHandler):
    """The file the noisy libraries write to, which also keeps the first line of the
    last error they logged (``last_error``, "" when none)."""

    def __init__(self, path: str):
        super().__init__(path, delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.last_error = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            self.last_error = text.strip().splitlines()[0] if text.strip() else ""
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A log that cannot be written (its disk is full, as often when orbax fails) is
        dropped: the run's own error says what happened."""

    def write_traceback(self, exc_type, exc_value, exc_tb) -> None:
        text = "".join(traceback.format_exception(exc_type, exc_value, exc_tb))
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the log's own disk may be full: drop it
            pass
        finally:
            self.release()


# The innermost diversion in force (None outside every one).
_current: LibraryLog | None = None
_call_soon_threadsafe = asyncio.BaseEventLoop.call_soon_threadsafe
_exit_is_quiet = False


def _call_soon_threadsafe_or_drop(loop, callback, *args, context=None):
    if loop.is_closed() and (_current is not None or _exit_is_quiet):
        if _current is not None:  # into the diversion's file; after it, the command's
            logging.getLogger("asyncio").warning(  # own last line is the only one
                "dropped %r: its event loop is closed (a write callback after a failed save)",
                callback)
        return None
    return _call_soon_threadsafe(loop, callback, *args, context=context)


def _is_noise(exc_type, exc_value, exc_tb) -> bool:
    if exc_type is RuntimeError and "Event loop is closed" in str(exc_value):
        return True
    files = [frame.filename for frame in traceback.extract_tb(exc_tb)] if exc_tb else []
    return bool(files) and all(any(n in f for n in _NOISY_FILES) for f in files)


@contextlib.contextmanager
def diverted(path: str) -> Iterator[LibraryLog]:
    """Send the noisy libraries' logs and tracebacks to ``path`` while inside; yields
    the :class:`LibraryLog`. On leaving, every logger's handlers and propagation, the
    three exception hooks and asyncio's ``call_soon_threadsafe`` are what they were."""
    global _current
    log = LibraryLog(path)
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    saved_loggers = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    saved_hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    saved_call = asyncio.BaseEventLoop.call_soon_threadsafe
    previous_sys, previous_thread, previous_unraisable = saved_hooks

    def sys_hook(exc_type, exc_value, exc_tb):
        if _is_noise(exc_type, exc_value, exc_tb):
            log.write_traceback(exc_type, exc_value, exc_tb)
        else:
            previous_sys(exc_type, exc_value, exc_tb)

    def thread_hook(args):
        if _is_noise(args.exc_type, args.exc_value, args.exc_traceback):
            log.write_traceback(args.exc_type, args.exc_value, args.exc_traceback)
        else:
            previous_thread(args)

    def unraisable_hook(args):
        # A full disk seen again by a library's own exit handler (TensorBoard's flush):
        # the run has said so in its one line already.
        full = isinstance(args.exc_value, OSError) and args.exc_value.errno == errno.ENOSPC
        if full or _is_noise(args.exc_type, args.exc_value, args.exc_traceback):
            log.write_traceback(args.exc_type, args.exc_value, args.exc_traceback)
        else:
            previous_unraisable(args)

    outer = _current
    for lg in loggers:
        for old in [h for h in lg.handlers if isinstance(h, LibraryLog)]:
            lg.removeHandler(old)  # an outer diversion's file, back when this one ends
        lg.addHandler(log)
        lg.propagate = False
    sys.excepthook, threading.excepthook, sys.unraisablehook = (
        sys_hook, thread_hook, unraisable_hook)
    asyncio.BaseEventLoop.call_soon_threadsafe = _call_soon_threadsafe_or_drop
    _current = log
    try:
        yield log
    finally:
        _current = outer
        asyncio.BaseEventLoop.call_soon_threadsafe = saved_call
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved_hooks
        for lg, handlers, propagate in saved_loggers:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        log.close()


def _stderr_closed_at_exit() -> None:
    try:
        sys.stderr.flush()
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        os.close(fd)
    except (OSError, ValueError):
        pass


def quiet_exit() -> None:
    """For a program that owns its process (the command line), once: calls on closed
    event loops are dropped from now on, and the standard error is closed to what is
    still printed while the interpreter shuts down, after the program's own last line."""
    global _exit_is_quiet
    if _exit_is_quiet:
        return
    _exit_is_quiet = True
    asyncio.BaseEventLoop.call_soon_threadsafe = _call_soon_threadsafe_or_drop
    atexit.register(_stderr_closed_at_exit)
