"""Shared test helpers: the repository's path, the tiny run and its flags, child processes'
environments, a tiny ResNet, tree comparisons, meshes, a recompilation guard, tmpfs,
bounded subprocesses and free ports."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax.models import BasicBlock, ResNet
from lsgd_jax.parallel.distributed import cpu_device_env, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TESTS = os.path.join(ROOT, "tests")

# The tiny run: synthetic images, ResNet-8 at 32 px, kn = 32 in BN groups of 4. Tests add
# their epochs, schedule and logging to it.
TINY = dict(data="synthetic", model="resnet8", image_size=32, batch_size=32, bn_group_size=4,
            synthetic_examples=128, synthetic_eval_examples=40, eval_batch_size=16,
            dtype="float32", num_classes=10)


# The tiny run of the trainer's tests: 3 epochs of 4 steps, a decay at epoch 2.
TINY_RUN = TINY | dict(epochs=3, warmup_epochs=1, decay_epochs=(2,), log_every_steps=1)
TINY_RUN_STEPS = 12
TRAINER = os.path.join(ROOT, "experiments", "imagenet_resnet50.py")


def as_flags(fields: dict) -> list[str]:
    """``TrainConfig`` fields as the flags of ``lsgd-jax train``, as a user would type them."""
    from lsgd_jax.training.config import TrainConfig, as_typed, flag_of

    flags = {f.name: flag_of(f) for f in dataclasses.fields(TrainConfig)}
    return [x for name, value in fields.items() for x in (flags[name], as_typed(value))]


def subprocess_env(devices: int | None = 1, *paths: str) -> dict:
    """The environment of a test's child process: this checkout (and ``paths``) first on
    PYTHONPATH and, unless ``devices`` is None, JAX on that many fake CPU devices."""
    env = dict(os.environ) if devices is None else cpu_device_env(devices)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *paths, env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


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


def run_trainer(args: list[str], timeout: float = 240, devices: int = 8
                ) -> subprocess.CompletedProcess:
    """``experiments/imagenet_resnet50.py ARGS`` on ``devices`` fake CPU devices, to its end."""
    import sys

    return subprocess.run([sys.executable, TRAINER, *args, "--cpu-devices", str(devices)],
                          env=subprocess_env(None), capture_output=True, text=True,
                          timeout=timeout)


def start_trainer(args: list[str], devices: int = 8) -> subprocess.Popen:
    """The same, started (output in ``stdout``, stderr merged)."""
    import sys

    return subprocess.Popen([sys.executable, TRAINER, *args, "--cpu-devices", str(devices)],
                            env=subprocess_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_record(workdir, proc, predicate, timeout: float = 180) -> None:
    """Wait until a record of ``workdir``'s metrics.jsonl satisfies ``predicate``; fail the
    test if ``proc`` ends first or ``timeout`` seconds pass (the process is then killed)."""
    import time

    import pytest

    from lsgd_jax.training.metrics import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(predicate(r) for r in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early with status {proc.returncode}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("timed out waiting for the run to reach the expected point")


def complete_checkpoints(workdir) -> list[int]:
    """Steps of the finished checkpoints (orbax renames a checkpoint to its step when done)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def final_sha(workdir, step: int = TINY_RUN_STEPS) -> str:
    """The state SHA-256 recorded with the checkpoint of ``step``."""
    from lsgd_jax.training.metrics import read_metrics

    records = [r for r in read_metrics(workdir, "checkpoint") if r["step"] == step]
    assert records, f"no checkpoint at step {step} in {workdir}"
    return records[-1]["state_sha256"]


def write_lock(path, **holder) -> None:
    """A workdir lock file at ``path`` held by ``holder`` (pid, token, heartbeat...) on this
    host, started now unless given."""
    import json
    import socket
    import time

    path.write_text(json.dumps({"host": socket.gethostname(), "started": time.time()} | holder))


# The run that the after-training tests read (the session's ``run_dir`` and ``model_path``
# fixtures in conftest.py): 12 steps on 8 fake devices, 10 synthetic classes.
TRAINED = TINY | dict(epochs=3, warmup_epochs=1, decay_epochs=(2,), log_every_steps=4)


def tree_snapshot(path) -> dict:
    """Every file and folder under ``path`` with its size and modification time (to prove
    that nothing was touched)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def run_script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``experiments/NAME ARGS`` in a child process, to its end, output captured."""
    import sys

    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args],
                          env=subprocess_env(None), capture_output=True, text=True,
                          timeout=timeout)


def error_line(stderr: str) -> str:
    """The one ``error: `` line of a command's stderr (a test fails on none or several)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def validation_images(folder, count: int = 40) -> tuple[list[str], np.ndarray]:
    """The synthetic validation images of TRAINED as PNG files (lossless), with labels."""
    from PIL import Image

    from lsgd_jax.data import open_source
    from lsgd_jax.training.config import TrainConfig

    source = open_source(TrainConfig(**TRAINED), "validation")
    batch = source.get_batch(np.arange(count), seed=0, epoch=0, train=False)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(batch["image"]):
        paths.append(os.path.join(folder, f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths, batch["label"]


def copy_workdir(run_dir, tmp_path) -> str:
    """A copy of ``run_dir`` to damage or change."""
    import shutil

    target = str(tmp_path / "copy")
    shutil.copytree(run_dir, target)
    return target


def tampered_model(model_path, tmp_path, edit_meta=None, edit_bytes=None) -> str:
    """A copy of an exported model (its .msgpack and .json) with ``edit_bytes(bytearray)``
    applied to the weights and ``edit_meta(dict)`` to the description; returns its path."""
    import json
    import shutil

    folder = tmp_path / "tampered"
    folder.mkdir(exist_ok=True)
    target = str(folder / "model.msgpack")
    shutil.copy(model_path, target)
    shutil.copy(model_path.replace(".msgpack", ".json"), str(folder / "model.json"))
    if edit_bytes:
        data = bytearray(open(target, "rb").read())
        edit_bytes(data)
        open(target, "wb").write(bytes(data))
    if edit_meta:
        meta = json.load(open(folder / "model.json"))
        edit_meta(meta)
        json.dump(meta, open(folder / "model.json", "w"))
    return target


# The optimizer tests' problem: a conv, a BN and a dense layer, random gradients, and the
# paper's 8k schedule over 17 epochs of 2 steps (warmup, then decays at 8, 12 and 14).
OPT_STEPS = 34


def opt_schedule():
    from lsgd_jax.rules.schedules import goyal_schedule

    return goyal_schedule(batch_size=8192, steps_per_epoch=2, decay_epochs=(8, 12, 14))


def opt_params(key):
    """Parameters with a conv kernel, BN scale and bias, and a dense kernel and bias."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
        "bn": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
        "dense": {"kernel": jax.random.normal(k2, (4, 5)), "bias": jax.random.normal(k3, (5,))},
    }


def opt_grads(step, params):
    """Random gradients shaped like ``params``, fixed by ``step``."""
    key = jax.random.fold_in(jax.random.key(7), step)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# The study's tests (test_small_scale, test_beyond).
def study_config(run):
    """A study run's TrainConfig, parsed from its flags as the trainer parses them."""
    from lsgd_jax.cli.train import build_parser, config_from_args
    from lsgd_jax.study import train_flags

    return config_from_args(build_parser().parse_args(train_flags(run)))


def study_plan(run, scale) -> dict:
    """A study run's Plan on its scale's data and devices."""
    from lsgd_jax.training.plan import make_plan

    return make_plan(study_config(run), num_train_examples=scale.train_examples,
                     num_devices=scale.devices(int(run.flag("--batch-size")))).to_dict()


def fake_metrics(workdir, errors, *, result=True) -> None:
    """A run's metrics.jsonl: one train and one eval record per epoch, then the result."""
    import json

    os.makedirs(workdir, exist_ok=True)
    records = []
    for epoch, err in enumerate(errors, start=1):
        records.append({"kind": "train", "step": 10 * epoch, "epoch": epoch, "lr": 0.1,
                        "loss": 1.0 / epoch, "top1_error": err})
        records.append({"kind": "eval", "step": 10 * epoch, "epoch": epoch, "top1_error": err})
    if result:
        records.append({"kind": "result", "step": 10 * len(errors)})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")


def study_paths(tmp_path):
    """The study's folders (runs, results) under ``tmp_path``."""
    from lsgd_jax.study import Paths

    return Paths(out=str(tmp_path / "runs"), results=str(tmp_path / "results"))
