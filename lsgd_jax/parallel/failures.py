"""One process's failure stops every process of the run, with its message on the console.

When one of several processes fails (bad data, a dead decoding worker, a damaged
shard, out of memory), its peers are usually waiting inside a collective for it.
Left alone, they end in a Gloo or NCCL error that hides the cause, or hang. So the
failure travels through JAX's coordination service, not through a collective:

* the failing process publishes its one-line error under a key of the service's
  key-value store (:func:`publish`), skips every collective of its clean-up, waits
  a few seconds for the others to take note, and exits with its status;
* every process runs a watcher thread (:func:`watch_peers`) that polls those keys;
  on a peer's error it prints ``error: process N failed: ...``, acknowledges, and
  exits with the same status, wherever its main thread is blocked;
* a process that dies without a word (SIGKILL, a lost host) stops sending heartbeats;
  after ``--heartbeat-timeout`` JAX's coordination service reports it to the others,
  which then end with JAX's own C++ abort (exit status 134, "Terminating process
  because the JAX distributed service detected fatal errors ... stopped sending
  heartbeats", the lost process's index on the next line). jaxlib's client takes an
  error callback in place of that abort, but ``jax.distributed.initialize`` passes
  none, and a Python callback given to the client directly ends the process with
  ``std::bad_cast`` (jaxlib 0.10.2 cannot hand the status to Python), so the abort
  stays.

All of it is a no-op in a single process. The keys and the exits work the same
under Gloo (CPU) and NCCL (GPU): neither is involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

FAILED = "lsgd_jax/failed/"  # + process index: {"message", "status"}
ACK = "lsgd_jax/ack/"        # + failed process / + acknowledging process
GONE = "lsgd_jax/gone/"      # + a process about to exit (process 0 exits last)
POLL_SECONDS = 0.25
ACK_SECONDS = 10.0           # how long a failing process waits for its peers to take note


def _client():
    """The coordination service's client, or None in a single process."""
    import jax
    from jax._src import distributed

    if jax.process_count() == 1:
        return None
    return distributed.global_state.client


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 (a closed stream must not stop the exit)
            pass


def _leave(client, status: int) -> None:
    """Exit now, without the at-exit clean-up (JAX's shutdown would wait for peers that
    are gone or going). Process 0 hosts the coordination service, whose end aborts every
    process still connected: so it leaves last, once the others have marked themselves
    gone (or after ``ACK_SECONDS``); the others mark themselves and leave at once."""
    import jax

    me, count = jax.process_index(), jax.process_count()
    _flush()
    try:
        if me != 0:
            client.key_value_set(f"{GONE}{me}", "1")
        else:
            deadline = time.monotonic() + ACK_SECONDS
            while (time.monotonic() < deadline
                   and len(client.key_value_dir_get(GONE)) < count - 1):
                time.sleep(POLL_SECONDS / 5)
            time.sleep(POLL_SECONDS)  # the last one marked itself just before its exit
    except Exception:  # noqa: BLE001 (the service is gone already)
        pass
    os._exit(status)


class _State:
    """This process's part: whether it has failed, and its watcher."""

    failed = False
    watcher: threading.Thread | None = None
    stop = threading.Event()
    peer_failed = threading.Event()  # the watcher is stopping this process for a peer
    deciding_since: float | None = None  # inside decided_together(): since when


def failed() -> bool:
    """Whether this process has published a failure (its clean-up then skips collectives)."""
    return _State.failed


def publish(message: str, status: int) -> bool:
    """Tell every process that this one failed; True when there are peers to tell.

    Idempotent: the first message is the one the peers see.
    """
    client = _client()
    if client is None:
        return False
    import jax

    me = jax.process_index()
    if not _State.failed:
        _State.failed = True
        _State.stop.set()  # this process's own watcher must not exit in its place
        try:
            client.key_value_set(f"{FAILED}{me}", json.dumps(
                {"message": message, "status": int(status)}))
        except Exception:  # noqa: BLE001 (the service may be gone with process 0)
            return False
    return True


def wait_for_peers(timeout: float = ACK_SECONDS) -> None:
    """After :func:`publish`: wait until every peer acknowledged (or ``timeout``), so that
    none is left in a collective with this process gone, and process 0's service lives
    until they have read the message."""
    client = _client()
    if client is None:
        return
    import jax

    me, count = jax.process_index(), jax.process_count()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A peer took note, or failed itself (the same error on every process).
            done = {int(k.rstrip("/").rsplit("/", 1)[-1])
                    for prefix in (f"{ACK}{me}/", FAILED)
                    for k, _ in client.key_value_dir_get(prefix)}
            if len(done - {me}) >= count - 1:
                return
        except Exception:  # noqa: BLE001
            return
        time.sleep(POLL_SECONDS)


def yield_to_peer() -> None:
    """Called first on any error of this process: when the watcher is already stopping it
    for a peer's failure, this error is a consequence (a collective whose peer left), so it
    is not reported; the watcher ends the process."""
    if _State.peer_failed.is_set():
        time.sleep(3 * ACK_SECONDS)
        os._exit(1)  # the watcher did not get to it: a status, at least


# How long the watcher defers a peer's failure while this process decides together with
# its peers: long enough to reach the same verdict, short enough for a peer that failed
# for another reason to be reported.
DECIDING_SECONDS = 60.0


@contextlib.contextmanager
def decided_together():
    """A check every process makes on values they all share (an exchange, then a
    comparison): an error raised inside is raised by every process alike, so each reports
    its own, not the first peer's. The watcher defers peers' failures while inside (up to
    ``DECIDING_SECONDS``), and for good when the check raises: this process is about to
    report the same error itself."""
    _State.deciding_since = time.monotonic()
    try:
        yield
    except BaseException:
        raise  # stays deciding: the error is this process's own to report
    else:
        _State.deciding_since = None


def _deferring() -> bool:
    since = _State.deciding_since
    return since is not None and time.monotonic() - since < DECIDING_SECONDS


def fail_and_exit(message: str, status: int) -> None:
    """The failing process's end: publish, wait for the peers, exit without clean-up.
    Returns (nothing published) in a single process."""
    if publish(message, status):
        wait_for_peers()
        _leave(_client(), status)


def _peer_failures(client, me: int) -> list[tuple[int, dict]]:
    found = []
    for key, value in client.key_value_dir_get(FAILED):
        index = int(key.rstrip("/").rsplit("/", 1)[-1])
        if index != me:
            found.append((index, json.loads(value)))
    return sorted(found)


def _watch(client, me: int, poll: float) -> None:
    while not _State.stop.wait(poll):
        try:
            failures = _peer_failures(client, me)
        except Exception:  # noqa: BLE001 (the service is gone: the heartbeat path reports it)
            return
        if failures and not _State.stop.is_set() and not _deferring():
            _State.peer_failed.set()
            index, failure = failures[0]
            print(f"error: process {index} failed: {failure['message']} (process {me} "
                  "stops too)", file=sys.stderr, flush=True)
            try:
                client.key_value_set(f"{ACK}{index}/{me}", "1")
            except Exception:  # noqa: BLE001
                pass
            _leave(client, int(failure.get("status") or 1))


def watch_peers(poll: float = POLL_SECONDS) -> None:
    """Start this process's watcher of its peers' failures (once; no-op in one process)."""
    client = _client()
    if client is None or _State.watcher is not None:
        return
    import jax

    _State.stop.clear()
    _State.watcher = threading.Thread(target=_watch, args=(client, jax.process_index(), poll),
                                      name="lsgd_jax-peer-watch", daemon=True)
    _State.watcher.start()


def stop_watching() -> None:
    """End the watcher (a run that finished: its peers' exits are no failures)."""
    _State.stop.set()
    if _State.watcher is not None:
        _State.watcher.join(timeout=5)
    _State.watcher = None
