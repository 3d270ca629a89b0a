"""The trainer with --optimizer lars --schedule poly --label-smoothing: the rates it logs,
the recipe it names, the default recipe left as it was; a LARS run and a poly run
resumed after kill -9 end bit-identical to uninterrupted ones."""

import json
import os
import subprocess
import sys

import pytest
from helpers import (
    ROOT,
    TINY,
    TINY_RUN,
    TINY_RUN_STEPS,
    as_flags,
    complete_checkpoints,
    final_sha,
    run_trainer,
    start_trainer,
    subprocess_env,
    wait_for_record,
)

from lsgd_jax.training.metrics import read_metrics

ENTRY = os.path.join(ROOT, "experiments", "imagenet_resnet50.py")
# ResNet-8 on 32-pixel synthetic images, kn = 32 on 4 fake devices, 4 steps per epoch.
FLAGS = [*as_flags(TINY | dict(synthetic_eval_examples=32, epochs=2, reference_batch_size=8,
                               base_lr=0.05, warmup_epochs=0.5, log_every_steps=1)),
         "--cpu-devices", "4"]


def test_a_lars_poly_smoothed_run_follows_its_schedule_and_names_its_recipe(tmp_path):
    env = subprocess_env(None)
    out = subprocess.run([sys.executable, ENTRY, *FLAGS, "--workdir", str(tmp_path),
                          "--optimizer", "lars", "--trust-coefficient", "0.02",
                          "--schedule", "poly", "--poly-power", "2", "--end-lr", "0.01",
                          "--label-smoothing", "0.1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    recipe = ("recipe: LARS (trust coefficient 0.02) + Nesterov momentum SGD, eq9, gradual "
              "warmup, poly decay (power 2, end rate 0.01), label smoothing 0.1")
    assert recipe in out.stdout + out.stderr  # the start line
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["plan"]["recipe"] == recipe and saved["config"]["optimizer"] == "lars"
    # By hand: k = 4, kη = 0.2; warmup W = 2 steps from 0.05 (+0.075 a step); then
    # 0.01 + 0.19·(1 − (t − 2)/6)² to T = 8 steps.
    expected = [0.05, 0.125] + [0.01 + 0.19 * (1 - (t - 2) / 6) ** 2 for t in range(2, 8)]
    logged = {r["step"]: r["lr"] for r in read_metrics(str(tmp_path), "train")}
    assert [logged[s] for s in range(1, 9)] == pytest.approx(expected, rel=1e-6)
    assert read_metrics(str(tmp_path), "result")


# The kill -9 test's run (test_train.py) with another optimizer or schedule.
RECIPES = {"lars": ["--optimizer", "lars", "--trust-coefficient", "0.02"],
           "poly": ["--schedule", "poly", "--poly-power", "2", "--end-lr", "0.001"]}


def _losses(workdir):
    """The loss logged at each step; a step run again after a resume counts once, as rerun."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_lars_or_poly_run_killed_mid_run_resumes_bit_identical(tmp_path, recipe):
    """Resuming restores the run's own optimizer state (its momentum, its last rate) and
    schedule: the final state's SHA-256 and every logged loss equal an uninterrupted run's."""
    flags = [*as_flags(TINY_RUN | dict(checkpoint_every_steps=2)), *RECIPES[recipe]]
    reference = str(tmp_path / "reference")
    result = run_trainer(["--workdir", reference, *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = str(tmp_path / "killed")
    proc = start_trainer(["--workdir", workdir, *flags])
    try:  # past step 5, with a checkpoint to resume from (one every 2 steps)
        wait_for_record(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= 5
                  and complete_checkpoints(workdir))
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    complete = complete_checkpoints(workdir)
    assert complete and complete[-1] < TINY_RUN_STEPS
    result = run_trainer(["--workdir", workdir, *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {os.path.join(workdir, 'checkpoints', str(complete[-1]))}" in (
        result.stdout)
    assert final_sha(workdir) == final_sha(reference)
    assert _losses(workdir) == _losses(reference) and len(_losses(reference)) == TINY_RUN_STEPS
