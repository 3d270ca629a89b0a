"""One process's failure stops every process of the run with that failure's message.

Processes on 127.0.0.1 with Gloo. Without lsgd_jax.parallel.failures, the peer waiting in a
collective ends in a Gloo error or abort that hides the cause (or hangs under NCCL).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TESTS, free_port, run_together, subprocess_env

HERE = Path(__file__).parent
REPO = HERE.parent
TIMEOUT_S = 240
ABORTS = ("Terminating process", "EnforceNotMet", "Check failure stack trace")


def _env(devices: int = 1) -> dict:
    return subprocess_env(devices, TESTS)


def test_a_single_process_publishes_nothing():
    from lsgd_jax.parallel import failures

    assert failures.publish("x", 2) is False and not failures.failed()
    failures.fail_and_exit("x", 2)  # returns: no peers to tell, the caller exits itself


class _Peers:
    """A stand-in for the coordination service's client: peer 1 has failed."""

    def key_value_dir_get(self, prefix):
        return [(f"{prefix}1", '{"message": "the same check failed", "status": 2}')]

    def key_value_set(self, key, value):
        pass


def _watch_briefly(monkeypatch, failures, seconds=0.3):
    """Run the watcher of process 0 against a failed peer 1; whether it stopped the process."""
    import threading

    left = []
    def leave(client, status):  # the real one exits the process: this one ends the watcher
        left.append(status)
        failures._State.stop.set()

    monkeypatch.setattr(failures, "_leave", leave)
    monkeypatch.setattr(failures._State, "stop", threading.Event())
    monkeypatch.setattr(failures._State, "peer_failed", threading.Event())
    watcher = threading.Thread(target=failures._watch, args=(_Peers(), 0, 0.01))
    watcher.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not left:
        time.sleep(0.01)
    failures._State.stop.set()
    watcher.join(5)
    return left


def test_a_check_every_process_makes_alike_is_reported_by_each_not_as_the_peers(monkeypatch):
    """Inside decided_together, a peer's failure is deferred (that peer reached the same
    verdict first); when the check raises, this process reports its own error."""
    from lsgd_jax.parallel import failures

    monkeypatch.setattr(failures._State, "deciding_since", None)
    assert _watch_briefly(monkeypatch, failures) == [2]  # outside: the peer's failure stops it
    with pytest.raises(ValueError):
        with failures.decided_together():
            assert _watch_briefly(monkeypatch, failures) == []  # deferred while deciding
            raise ValueError("process 1 reads other data than process 0")
    assert _watch_briefly(monkeypatch, failures) == []  # its own error is about to be reported
    with failures.decided_together():
        pass
    assert failures._State.deciding_since is None
    monkeypatch.setattr(failures._State, "deciding_since", time.monotonic() - 2 * (
        failures.DECIDING_SECONDS))
    assert _watch_briefly(monkeypatch, failures) == [2]  # a deferral does not last for ever


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0])
def test_an_error_on_one_process_ends_both_with_its_message(tmp_path, failing):
    """Process ``failing`` runs out of memory while its peer is inside an all-reduce."""
    port = free_port()
    commands = [[sys.executable, str(HERE / "failing_peer.py"), f"127.0.0.1:{port}", str(i),
                 str(failing)] for i in range(2)]
    statuses, texts = run_together(commands, [_env()] * 2, tmp_path, timeout=TIMEOUT_S)
    peer = 1 - failing
    for i, text in enumerate(texts):
        assert statuses[i] == 1, f"process {i}: {statuses[i]}\n{text[-3000:]}"
        assert not any(a in text for a in ABORTS), text[-3000:]
    assert f"error: process {failing}: RuntimeError: RESOURCE_EXHAUSTED" in texts[failing]
    lines = [line for line in texts[peer].splitlines() if line.startswith("error:")]
    assert lines == [f"error: process {failing} failed: RuntimeError: RESOURCE_EXHAUSTED: Out "
                     "of memory while trying to allocate 123456789 bytes (a stand-in for XLA's "
                     f"report) (process {peer} stops too)"]


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from tiny_imagenet import build

    return build(tmp_path_factory.mktemp("tfds"))


def _local(tmp_path, data_dir, *flags, during=None):
    """``launch/local.sh 2 1`` on the tiny tfds set; ``during(proc)`` runs once training has
    begun. Returns (status, output)."""
    from tiny_imagenet import BUILDER

    cmd = ["bash", str(REPO / "launch" / "local.sh"), "2", "1", "--workdir",
           str(tmp_path / "w"), "--data", "imagenet", "--tfds-name", BUILDER, "--data-dir",
           data_dir, "--model", "resnet8", "--image-size", "16", "--batch-size", "8",
           "--bn-group-size", "4", "--eval-batch-size", "8", "--dtype", "float32",
           "--epochs", "30", "--log-every-steps", "1", "--decode-threads", "1", *flags]
    env = dict(_env(), PYTHON=sys.executable)
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if during is not None:
                deadline = time.monotonic() + TIMEOUT_S
                while "first step done" not in log.read_text() and proc.poll() is None:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
                during(proc)
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_bad_data_on_one_process_ends_the_run_with_its_message(tiny_tfds, tmp_path):
    """One undecodable JPEG, --max-bad-fraction 0: the process that meets it names it, and
    its peer (waiting in the step's all-reduce) prints that error too, not a Gloo abort."""
    status, out = _local(tmp_path, tiny_tfds, "--max-bad-fraction", "0")
    assert status not in (0, 134), out[-3000:]
    assert not any(a in out for a in ABORTS), out[-3000:]
    own = [line for line in out.splitlines() if line.startswith("error: process ")
           and "failed:" not in line and "undecodable" in line]
    assert len(own) == 1, out[-3000:]
    failing = own[0].split(":")[1].split()[-1]
    assert f"error: process {failing} failed: " in out and "(process" in out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _descendants(pid: int) -> list[int]:
    out = []
    for kid in _children(pid):
        out += [kid] + _descendants(kid)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_decode_worker_on_one_process_ends_the_run_with_its_message(
        tiny_tfds, tmp_path, how):
    """SIGKILL, or SIGSTOP (found hung after the workers' 30 s stall timeout)."""
    def kill_a_worker_of_process_1(proc):
        trainers = [p for p in _descendants(proc.pid) if "--process-id 1" in _cmdline(p)]
        assert trainers, "process 1 not found"
        # The decoding workers are the children of process 1's forkserver.
        servers = [p for p in _children(trainers[0]) if "forkserver" in _cmdline(p)]
        workers = [w for server in servers for w in _children(server)]
        assert workers, "no decode worker found under process 1"
        os.kill(workers[-1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    status, out = _local(tmp_path, tiny_tfds, "--max-bad-fraction", "0.5",
                         "--decode-workers", "1", during=kill_a_worker_of_process_1)
    assert status not in (0, 134), out[-3000:]
    assert not any(a in out for a in ABORTS), out[-3000:]
    assert "error: process 1: " in out and "decode worker" in out, out[-3000:]
    assert ("hangs: no image finished" in out) == (how == "hung"), out[-3000:]
    assert "error: process 1 failed: " in out and "(process 0 stops too)" in out, out[-3000:]


@pytest.mark.slow
def test_a_damaged_shard_over_the_limit_on_one_process_ends_the_run_with_its_message(
        tiny_tfds, tmp_path):
    from tiny_imagenet import damaged_copy

    copy, shard = damaged_copy(tiny_tfds, tmp_path / "tfds", "block")
    status, out = _local(tmp_path, copy, "--max-bad-fraction", "0")
    assert status == 2, out[-3000:]
    assert not any(a in out for a in ABORTS), out[-3000:]
    own = [line for line in out.splitlines() if line.startswith("error: process ")
           and "failed:" not in line]
    assert len(own) == 1 and shard in own[0] and "unreadable record" in own[0], out[-3000:]
    failing = own[0].split(":")[1].split()[-1]
    peer = 1 - int(failing)
    assert f"error: process {failing} failed: " in out and f"(process {peer} stops too)" in out
