"""Library noise goes to a file in the workdir; the console gets our one-line errors.

When a save fails (a full disk), orbax logs tracebacks from its save threads and
tensorstore's callbacks print "Event loop is closed" tracebacks at exit: hundreds
of lines around the one line that says what happened. :func:`divert_library_noise`
sends the loggers of orbax and asyncio, and those tracebacks, to
``WORKDIR/orbax.log`` (one file per process), and remembers the last error they
logged, so that our own error can quote it.

The loudest noise is tensorstore's: after a failed save its write callbacks still
schedule work on the asyncio loops orbax has closed, and each raises "Event loop is
closed" from a C++ thread, printed past every Python hook. Once diverted, such a
call on a closed loop is recorded in the log and dropped, as it would have been
after its traceback; the standard error is closed to whatever is still printed
while the interpreter shuts down.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import logging
import os
import sys
import threading
import traceback

# The loggers orbax (through absl), asyncio and tensorstore write to.
NOISY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")
# An uncaught exception whose traceback passes through these is library noise.
_NOISY_FILES = ("/orbax/", "/tensorstore/", "/asyncio/")


class _Diverted(logging.FileHandler):
    """A log file that also keeps the first line of the last error logged."""

    last_error = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            _Diverted.last_error = text.strip().splitlines()[0] if text.strip() else ""
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A log that cannot be written (its disk is full, as often when orbax fails) is
        dropped: the run's own error says what happened."""


_handler: _Diverted | None = None
_hooks_installed = False
_call_soon_threadsafe = asyncio.BaseEventLoop.call_soon_threadsafe


def _call_soon_threadsafe_or_drop(loop, callback, *args, context=None):
    if loop.is_closed() and _handler is not None:
        logging.getLogger("asyncio").warning(
            "dropped %r: its event loop is closed (a write callback after a failed save)",
            callback)
        return None
    return _call_soon_threadsafe(loop, callback, *args, context=context)


def _stderr_closed_at_exit() -> None:
    try:
        sys.stderr.flush()
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        os.close(fd)
    except (OSError, ValueError):
        pass


def _is_noise(exc_type, exc_value, exc_tb) -> bool:
    if exc_type is RuntimeError and "Event loop is closed" in str(exc_value):
        return True
    files = [frame.filename for frame in traceback.extract_tb(exc_tb)] if exc_tb else []
    return bool(files) and all(any(n in f for n in _NOISY_FILES) for f in files)


def _write(exc_type, exc_value, exc_tb) -> None:
    handler = _handler
    if handler is None:
        return
    text = "".join(traceback.format_exception(exc_type, exc_value, exc_tb))
    handler.acquire()
    try:
        if handler.stream is None:
            handler.stream = handler._open()
        handler.stream.write(text)
        handler.stream.flush()
    except (OSError, ValueError):  # the log's own disk may be full: drop it
        pass
    finally:
        handler.release()


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous_sys, previous_thread = sys.excepthook, threading.excepthook

    def sys_hook(exc_type, exc_value, exc_tb):
        if _handler is not None and _is_noise(exc_type, exc_value, exc_tb):
            _write(exc_type, exc_value, exc_tb)
        else:
            previous_sys(exc_type, exc_value, exc_tb)

    def thread_hook(args):
        if _handler is not None and _is_noise(args.exc_type, args.exc_value, args.exc_traceback):
            _write(args.exc_type, args.exc_value, args.exc_traceback)
        else:
            previous_thread(args)

    previous_unraisable = sys.unraisablehook

    def unraisable_hook(args):
        # A full disk seen again by a library's own exit handler (TensorBoard's flush):
        # the run has said so in its one line already.
        full = isinstance(args.exc_value, OSError) and args.exc_value.errno == errno.ENOSPC
        if _handler is not None and (full or _is_noise(args.exc_type, args.exc_value,
                                                       args.exc_traceback)):
            _write(args.exc_type, args.exc_value, args.exc_traceback)
        else:
            previous_unraisable(args)

    sys.excepthook, threading.excepthook = sys_hook, thread_hook
    sys.unraisablehook = unraisable_hook
    asyncio.BaseEventLoop.call_soon_threadsafe = _call_soon_threadsafe_or_drop
    atexit.register(_stderr_closed_at_exit)


def divert_library_noise(path: str) -> None:
    """Send the noisy libraries' logs and tracebacks to ``path`` from now on (this
    process; a later call moves them to another file)."""
    global _handler
    handler = _Diverted(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Diverted)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.propagate = False
    _handler = handler
    _Diverted.last_error = ""
    _install_hooks()


def last_library_error() -> str:
    """The first line of the last error the diverted libraries logged ("" if none)."""
    return _Diverted.last_error
