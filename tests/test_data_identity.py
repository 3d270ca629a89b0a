"""The data set is part of the run, and every process of a run agrees on its flags and data.

A checkpoint records each split's example count and fingerprint; a resume on other
data is refused, a moved copy of the same data resumes. Before compiling, every
process compares its flags and its data with process 0's.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, run_together

from lsgd_jax.data import get_source
from lsgd_jax.data.fashion_mnist import DEFAULT_DIR, write_subset
from lsgd_jax.parallel.distributed import cpu_device_env

HERE = Path(__file__).parent
REPO = HERE.parent
ENTRY = REPO / "experiments" / "imagenet_resnet50.py"
HAVE_FMNIST = os.path.exists(os.path.join(DEFAULT_DIR, "train-labels-idx1-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
FLAGS = ["--data", "fashion_mnist", "--model", "resnet8", "--batch-size", "32",
         "--bn-group-size", "4", "--eval-batch-size", "32", "--dtype", "float32",
         "--epochs", "1", "--warmup-epochs", "0", "--decay-epochs", "", "--log-every-steps", "1",
         "--checkpoint-every-steps", "2"]


def _subset(root, name, train, val=40, seed=0):
    return write_subset(DEFAULT_DIR, str(root / name), {"train": train, "validation": val},
                        seed=seed)


def _train(workdir, data_dir, *extra, devices=2, timeout=300):
    env = cpu_device_env(devices)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ENTRY), "--workdir", str(workdir), "--data-dir",
                           str(data_dir), "--cpu-devices", str(devices), *FLAGS, *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


@needs_fmnist
def test_identities_tell_data_apart_and_keep_a_moved_copy(tmp_path):
    a = _subset(tmp_path, "a", 120)
    same_count = _subset(tmp_path, "b", 120, seed=1)
    moved = shutil.copytree(a, tmp_path / "moved")
    ids = {name: get_source("fashion_mnist", split="train", data_dir=d).identity
           for name, d in (("a", a), ("b", same_count), ("moved", moved))}
    assert ids["a"] == ids["moved"] and ids["a"]["examples"] == 120
    assert ids["a"]["fingerprint"] != ids["b"]["fingerprint"]
    syn = [get_source("synthetic", split="train", num_examples=64, image_size=8, seed=s).identity
           for s in (0, 0, 1)]
    assert syn[0] == syn[1] and syn[0]["fingerprint"] != syn[2]["fingerprint"]


@needs_fmnist
@pytest.mark.slow
def test_a_resume_on_other_data_is_refused_and_a_moved_copy_resumes(tmp_path):
    small = _subset(tmp_path, "small", 128 - 8)  # 120 images: 3 steps of 32, then more data
    bigger = _subset(tmp_path, "bigger", 200)
    other = _subset(tmp_path, "other", 120, seed=1)
    workdir = tmp_path / "run"
    first = _train(workdir, small, "--num-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (workdir / "metrics.jsonl").read_bytes()
    for data, count in ((bigger, "200"), (other, "120")):
        again = _train(workdir, data, "--num-steps", "3")
        assert again.returncode == 2, again.stderr[-3000:]
        lines = again.stderr.strip().splitlines()
        assert "Traceback" not in again.stderr and lines[-1].startswith("error: cannot resume")
        assert "other data" in lines[-1] and "train split had 120 examples" in lines[-1]
        assert f"has {count}, fingerprint" in lines[-1] and "moved copy" in lines[-1]
        assert (workdir / "metrics.jsonl").read_bytes() == before  # nothing recorded
    moved = shutil.copytree(small, tmp_path / "elsewhere")
    resumed = _train(workdir, moved, "--num-steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout


def _two_processes(tmp_path, per_process, timeout=240):
    """Start processes 0 and 1 by hand, each with its own extra flags; (statuses, outputs)."""
    port = free_port()
    env = cpu_device_env(1)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    commands = [[sys.executable, str(ENTRY), "--workdir", str(tmp_path / "run"), *FLAGS,
                 "--num-steps", "2", "--coordinator-address", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout", "30",
                 "--shutdown-timeout", "10", *extra] for i, extra in enumerate(per_process)]
    return run_together(commands, [env] * len(commands), tmp_path, timeout=timeout)


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["recipe", "data"])
def test_processes_with_other_flags_or_data_stop_before_anything_is_written(tmp_path, case):
    data = _subset(tmp_path, "a", 120)
    if case == "recipe":
        extra = [["--data-dir", data, "--base-lr", "0.2"], ["--data-dir", data, "--base-lr", "0.5"]]
        expected = "error: process 1 was started with --base-lr 0.5, process 0 with 0.2"
    else:
        other = _subset(tmp_path, "b", 120, seed=1)
        extra = [["--data-dir", data], ["--data-dir", other]]
        expected = "error: process 1 reads other train data than process 0: 120 examples"
    statuses, outputs = _two_processes(tmp_path, extra)
    messages = []
    for index, (status, out) in enumerate(zip(statuses, outputs)):
        assert status == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        # Each process names itself, then the same message.
        assert len(errors) == 1 and errors[0].startswith(f"error: process {index}: "), out
        messages.append(errors[0].split(": ", 2)[2])
        assert "Traceback" not in out and "compiling" not in out
    assert messages[0] == messages[1] and ("error: " + messages[0]).startswith(expected)
    run = tmp_path / "run"
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert not (run / "config.json").exists()


def test_a_tfds_split_is_identified_by_its_prepared_record(tmp_path, tiny_tfds):
    from tiny_imagenet import BUILDER

    root = tiny_tfds
    moved = shutil.copytree(root, tmp_path / "moved")
    opts = dict(builder_name=BUILDER, image_size=16, eval_resize=20, decode_threads=1)
    ids = []
    for data_dir in (root, moved):
        with get_source("imagenet", split="train", data_dir=data_dir, **opts) as src:
            ids.append(src.identity)
    assert ids[0] == ids[1] and ids[0]["examples"] == 40 and ids[0]["split"] == "train"
    with get_source("imagenet", split="validation", data_dir=root, **opts) as src:
        assert src.identity["split"] == "validation"
