"""Shared test helpers: a tiny ResNet, tree comparisons, meshes, a recompilation guard."""

from __future__ import annotations

import contextlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax.models import BasicBlock, ResNet
from lsgd_jax.parallel.distributed import make_mesh


def tiny_resnet(bn_group_size, *, num_classes=10, dtype=jnp.float32, num_filters=4):
    """Stem + one residual block: 3 convolutions, each followed by BN. γ = 1 everywhere
    (no zero-γ) so that every BN and convolution gets a gradient."""
    return ResNet(stage_sizes=(1,), block=BasicBlock, num_filters=num_filters, stem="cifar",
                  num_classes=num_classes, bn_group_size=bn_group_size, dtype=dtype,
                  zero_init_residual=False)


def tree_allclose(a, b, **tol) -> None:
    """Assert two pytrees have the same structure and close leaves (``np.testing`` tol)."""
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def max_tree_diff(a, b) -> float:
    """The largest absolute difference between matching leaves."""
    pairs = zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def max_rel_diff(a, b) -> float:
    """The largest per-leaf ``max|a − b| / max|b|``."""
    diffs = jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)), a, b)
    return max(jax.tree.leaves(diffs))


def mesh_of(num_devices: int):
    """A ``("data",)`` mesh over the first ``num_devices`` (fake CPU) devices."""
    return make_mesh(jax.devices()[:num_devices])


def compilations(jitted) -> int:
    """How many programs a ``jax.jit`` function has compiled (the recompilation guard)."""
    return jitted._cache_size()


@contextlib.contextmanager
def small_tmpfs(where, size: str):
    """A tmpfs of ``size`` (mount's syntax: "1200k") at ``where``, unmounted after; the
    test is skipped where it cannot be mounted (mounting needs root)."""
    import pytest

    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        # Lazily: a process of the test may still hold a file open there.
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def in_small_dev_shm(size: str) -> list[str]:
    """A command prefix: what follows runs in a mount namespace of its own whose /dev/shm is
    a tmpfs of ``size`` (mount's syntax); then the shell prints what is left there as a last
    line "left in /dev/shm: [...]" and exits with the command's status. The test is skipped
    where such a namespace cannot be made (it needs root)."""
    import pytest

    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=4k tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs on /dev/shm in a mount namespace here (needs root)")
    script = (f'mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 99; "$@"; rc=$?; '
              'echo "left in /dev/shm: [$(ls -A /dev/shm)]"; exit $rc')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]


def run_bounded(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own, text output captured; past ``timeout``
    seconds the whole session (launchers, their children) is killed and the test fails."""
    import os
    import signal

    import pytest

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command[:8]} ran past {timeout:g} s; its end:\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[list[str]], envs: list[dict], log_dir, *,
                 timeout: float) -> tuple[list[int], list[str]]:
    """Start the processes of one run at once (as a launcher would, each with its own
    environment), wait for all within ``timeout`` seconds (then kill every one and let
    the test fail on their statuses), and return their statuses and outputs."""
    import time
    from pathlib import Path

    paths = [Path(log_dir) / f"p{i}.log" for i in range(len(commands))]
    procs, logs = [], []
    try:
        for command, env, path in zip(commands, envs, paths):
            logs.append(open(path, "w"))
            procs.append(subprocess.Popen(command, env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs], [path.read_text() for path in paths]


_BLOCKER = '''import os
import sys

_BLOCKED = set(filter(None, os.environ.get("LSGD_TEST_WITHOUT", "").split(",")))


class _Without:
    """Imports of the blocked packages fail, as where they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Without())
'''


def env_without(tmp_path, *modules: str) -> dict:
    """An environment for a subprocess in which importing any of ``modules`` (top-level
    package names) fails as if it were not installed: a ``sitecustomize`` on PYTHONPATH
    puts a finder that refuses them first on ``sys.meta_path``."""
    import os

    folder = tmp_path / "without"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LSGD_TEST_WITHOUT=",".join(modules))
    env["PYTHONPATH"] = os.pathsep.join([str(folder), root, env.get("PYTHONPATH", "")])
    return env


def global_batches(iterators, steps):
    """``steps`` global batches: the local batches of all processes' iterators, concatenated."""
    out = []
    for _ in range(steps):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")})
    return out


def assert_same_batches(a, b):
    """Bit-identical images and labels, batch by batch."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
