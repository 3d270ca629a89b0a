"""The ``lsgd-jax`` command from a wheel installed into a fresh virtual environment, run
outside the checkout: train, evaluate, export, predict (and ``python -m lsgd_jax``).

No network: the wheel is built without build isolation and installed without its
dependencies; a ``.pth`` file makes this environment's packages (jax, flax, ...)
importable after the new environment's own, so ``lsgd_jax`` comes from the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from helpers import ROOT, TINY, as_flags

TINY_FLAGS = as_flags(TINY | dict(epochs=1, warmup_epochs=0, median_evals=1))


def _run(command, cwd, env, timeout=240):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_command_trains_evaluates_exports_and_predicts(tmp_path):
    from PIL import Image

    source = tmp_path / "source"  # a copy: the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "lsgd_jax"), source / "lsgd_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)], tmp_path, env)
    wheels = os.listdir(tmp_path / "dist")
    assert len(wheels) == 1 and wheels[0].startswith("lsgd_jax-")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "-q", str(tmp_path / "dist" / wheels[0])], tmp_path, env)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path, env).stdout.strip()
    with open(os.path.join(site, "lsgd_jax_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"  # outside the checkout
    work.mkdir()
    where = _run([python, "-c", "import lsgd_jax; print(lsgd_jax.__file__)"], work, env)
    assert where.stdout.strip().startswith(site), where.stdout
    command = str(venv / "bin" / "lsgd-jax")
    train = _run([command, "train", "--workdir", "run", *TINY_FLAGS, "--cpu-devices", "8"],
                 work, env)
    assert "done: 4 steps" in train.stdout
    evaluated = _run([command, "evaluate", "--workdir", "run", "--cpu-devices", "4"], work, env)
    assert "step 4: top-1 error" in evaluated.stdout
    _run([command, "export", "--workdir", "run", "--out", "model.msgpack"], work, env)
    assert (work / "model.msgpack").exists() and (work / "model.json").exists()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(work / "black.png")
    predicted = _run([python, "-m", "lsgd_jax", "predict", "--model", "model.msgpack",
                      "black.png"], work, env)
    assert predicted.stdout.startswith("black.png: ") and predicted.stdout.count("%") == 5
    bad = subprocess.run([command, "frobnicate"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "train, curves, evaluate, export, predict" in bad.stderr
