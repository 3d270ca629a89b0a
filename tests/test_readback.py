"""Read-back (lsgd_jax.artifacts.readback): ``lsgd-jax evaluate`` of a workdir's verified
checkpoints on any device and process count, without disturbing a run that uses it.

The session's small run (``run_dir`` in conftest.py) serves every test; tests that damage
files work on copies of its workdir."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import (
    ROOT,
    TRAINED,
    as_flags,
    copy_workdir,
    error_line,
    run_script,
    subprocess_env,
    tree_snapshot,
)
from PIL import Image

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import eval_history, read_metrics

TINY = TRAINED
TINY_FLAGS = as_flags(TINY)


# ---------------------------------------------------------------- evaluate


# ---------------------------------------------------------------- evaluate
def test_evaluate_gives_the_runs_last_top1_exactly_and_changes_nothing(run_dir, capsys):
    from lsgd_jax.cli.main import evaluate_main

    last = list(eval_history(run_dir).values())[-1]
    result_before = read_metrics(run_dir, "result")
    before = tree_snapshot(os.path.join(run_dir, "checkpoints"))
    # Another eval batch size (24: the last batch is padded), the same images scored once.
    assert evaluate_main(["--workdir", run_dir, "--eval-batch-size", "24"]) == 0
    out = capsys.readouterr().out
    record = read_metrics(run_dir, "eval")[-1]
    assert record["source"] == "evaluate" and record["step"] == 12 == last["step"]
    assert record["top1_error"] == last["top1_error"]  # exactly
    assert record["top5_error"] == last["top5_error"] and record["count"] == 40
    assert record["eval_batch_size"] == 24 and record["epoch"] == 3.0
    assert f"top-1 error {100 * last['top1_error']:.2f}%" in out
    assert tree_snapshot(os.path.join(run_dir, "checkpoints")) == before
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    # The run's own history (and so its result) does not count the read-back.
    assert list(eval_history(run_dir).values())[-1] == last
    assert read_metrics(run_dir, "result") == result_before


def test_evaluate_on_another_device_count_and_an_older_step(run_dir):
    history = eval_history(run_dir)
    result = run_script("evaluate.py", "--workdir", run_dir, "--step", "8", "--cpu-devices", "2",
                     "--eval-batch-size", "6", "--no-record")
    assert result.returncode == 0, result.stderr
    assert f"top-1 error {100 * history[8]['top1_error']:.2f}%" in result.stdout
    assert f"top-5 error {100 * history[8]['top5_error']:.2f}%" in result.stdout
    assert "on 2 devices" in result.stdout


def test_a_read_back_record_does_not_replace_the_runs_evaluation(tmp_path):
    from lsgd_jax.training.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write("eval", 12, top1_error=0.5)
    writer.write("eval", 12, top1_error=0.25, source="evaluate")
    assert eval_history(str(tmp_path))[12]["top1_error"] == 0.5


def test_evaluate_bad_input_is_one_line_and_status_2(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("evaluate.py", "--workdir", str(empty))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert str(empty / "checkpoints") in line and "holds no checkpoint" in line
    result = run_script("evaluate.py", "--workdir", run_dir, "--step", "5")
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert os.path.join(run_dir, "checkpoints", "5") in line and "[4, 8, 12]" in line
    result = run_script("evaluate.py", "--workdir", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "does not exist" in error_line(result.stderr)


def test_a_failed_multi_host_launch_is_one_line_and_status_2(tmp_path, capsys):
    """evaluate and export start their processes under main_guard, as training does."""
    from lsgd_jax.cli.main import evaluate_main, export_main

    launch = ["--num-processes", "2", "--process-id", "1"]  # no --coordinator-address
    for main, extra in ((evaluate_main, []), (export_main, ["--out", str(tmp_path / "m")])):
        assert main(["--workdir", str(tmp_path), *extra, *launch]) == 2
        line = error_line(capsys.readouterr().err)
        assert "coordinator_address=None" in line and "num_processes=2" in line, line


def test_a_damaged_checkpoint_is_refused_or_skipped_and_never_moved(run_dir, tmp_path):
    from lsgd_jax.cli.main import evaluate_main

    work = copy_workdir(run_dir, tmp_path)
    ckpts = os.path.join(work, "checkpoints")
    # The saved hash no longer matches the state: the SHA-256 check must catch it.
    meta_path = os.path.join(ckpts, "12", "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["state_sha256"] = "0" * 64
    json.dump(meta, open(meta_path, "w"))
    # A save in progress of a run using the workdir (orbax's temporary name).
    in_progress = os.path.join(ckpts, "13.orbax-checkpoint-tmp-1")
    os.makedirs(os.path.join(in_progress, "state"))
    before = tree_snapshot(ckpts)
    result = run_script("evaluate.py", "--workdir", work, "--step", "12", "--no-record")
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "step 12 is damaged" in line and "SHA-256" in line and "nothing was changed" in line
    # Without --step: a warning names the damaged one, the previous one is evaluated.
    assert evaluate_main(["--workdir", work, "--no-record"]) == 0 or pytest.fail()
    assert tree_snapshot(ckpts) == before  # nothing moved, the save in progress untouched
    # A missing file of the state.
    os.remove(os.path.join(ckpts, "8", "state", "manifest.ocdbt"))
    result = run_script("evaluate.py", "--workdir", work, "--step", "8", "--no-record")
    assert result.returncode == 2
    assert os.path.join(ckpts, "8", "state", "manifest.ocdbt") in error_line(result.stderr)


def test_evaluate_falls_back_to_the_previous_verified_checkpoint(run_dir, tmp_path, capsys):
    from lsgd_jax.artifacts.readback import restore_run

    work = copy_workdir(run_dir, tmp_path)
    meta_path = os.path.join(work, "checkpoints", "12", "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["state_sha256"] = "f" * 64
    json.dump(meta, open(meta_path, "w"))
    logged = []
    restored = restore_run(work, log=logged.append)
    assert restored.step == 8
    assert len(logged) == 1 and "step 12 is damaged" in logged[0]
    assert os.path.isdir(os.path.join(work, "checkpoints", "12"))


def test_evaluate_reads_a_workdir_in_use_without_its_lock_or_disturbing_it(run_dir, tmp_path):
    """A run of 24 steps, a checkpoint every step; evaluation while it trains. Its first 12
    steps are those of the finished run (same seed and schedule), so its checkpoint at
    step 12 must have the same SHA-256."""
    from lsgd_jax.cli.main import evaluate_main

    work = str(tmp_path / "live")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments", "imagenet_resnet50.py"),
         "--workdir", work, *TINY_FLAGS, "--epochs", "6", "--checkpoint-every-steps", "1",
         "--log-every-steps", "1", "--cpu-devices", "8"],
        env=subprocess_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not any(r["kind"] == "checkpoint" for r in read_metrics(work)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the run saved no checkpoint in time"
            time.sleep(0.1)
        lock = json.load(open(os.path.join(work, ".lock")))
        assert evaluate_main(["--workdir", work]) == 0
        # Still the run's lock, and the run was still going when the evaluation ended.
        assert json.load(open(os.path.join(work, ".lock")))["pid"] == lock["pid"] == proc.pid
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert not [n for n in os.listdir(os.path.join(work, "checkpoints")) if "corrupt" in n]
    live = {r["step"]: r["state_sha256"] for r in read_metrics(work, "checkpoint")}
    done = {r["step"]: r["state_sha256"] for r in read_metrics(run_dir, "checkpoint")}
    assert live[12] == done[12] and max(live) == 24
    assert read_metrics(work, "result")[-1]["step"] == 24
    assert [r for r in read_metrics(work, "eval") if r.get("source") == "evaluate"]


def test_a_lars_run_is_read_back_with_the_lars_state(tmp_path):
    """evaluate and export restore onto the run's own optimizer's state (--optimizer):
    LARS's tree differs from goyal_sgd's, so a goyal_sgd target cannot stand in."""
    from lsgd_jax.artifacts.readback import evaluate_run, restore_run
    from lsgd_jax.cli.main import export_main
    from lsgd_jax.rules.lars import lars
    from lsgd_jax.rules.optim import goyal_sgd
    from lsgd_jax.training.loop import train_and_evaluate

    workdir = str(tmp_path / "lars")
    train_and_evaluate(TrainConfig(**TINY | dict(optimizer="lars", epochs=1, decay_epochs=())),
                       workdir, log=lambda msg: None)
    restored = restore_run(workdir, log=lambda msg: None)
    assert restored.step == 4 and restored.config.optimizer == "lars"
    want = jax.tree.structure(lars(0.0).init(restored.state.params))
    assert jax.tree.structure(restored.state.opt_state) == want
    assert want != jax.tree.structure(goyal_sgd(0.0).init(restored.state.params))
    result = evaluate_run(restored)
    assert result["top1_error"] == eval_history(workdir)[4]["top1_error"]
    assert export_main(["--workdir", workdir, "--out", str(tmp_path / "lars.msgpack")]) == 0


@pytest.mark.slow
def test_evaluate_and_export_on_two_processes(run_dir, model_path, tmp_path):
    """2 processes × 2 CPU devices (Gloo): the run's top-1, one record, one model file
    equal to the one-process export."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records_before = len(read_metrics(run_dir, "eval"))

    def launch(script, *args):
        procs = [subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "experiments", script), *args,
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), "--cpu-devices", "2"],
            env=subprocess_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        try:
            outs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out
        return outs

    outs = launch("evaluate.py", "--workdir", run_dir, "--eval-batch-size", "12")
    last = eval_history(run_dir)[12]
    assert f"top-1 error {100 * last['top1_error']:.2f}%" in outs[0] and "4 devices" in outs[0]
    assert "top-1 error" not in outs[1]  # process 0 reports
    records = read_metrics(run_dir, "eval")
    assert len(records) == records_before + 1 and records[-1]["num_processes"] == 2
    assert records[-1]["top1_error"] == last["top1_error"]
    out = str(tmp_path / "two.msgpack")
    launch("export.py", "--workdir", run_dir, "--out", out)
    assert open(out, "rb").read() == open(model_path, "rb").read()


def test_the_eval_transform_of_a_one_channel_model_and_of_imagenet(tmp_path):
    """Fashion-MNIST-sized files come back as their pixels; ImageNet's is resize 256, crop
    224 (decode_eval), made RGB from CMYK."""
    from lsgd_jax.artifacts.predict import load_image
    from lsgd_jax.data.augment import decode_eval

    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "item.png")
    small = {"image_size": 28, "eval_resize": 28, "channels": 1}
    np.testing.assert_array_equal(load_image(str(tmp_path / "item.png"), small),
                                  pixels[..., None])
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 500, 3), np.uint8))
    photo.convert("CMYK").save(tmp_path / "photo.jpg")
    imagenet = {"image_size": 224, "eval_resize": 256, "channels": 3}
    data = (tmp_path / "photo.jpg").read_bytes()
    out = load_image(str(tmp_path / "photo.jpg"), imagenet)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, decode_eval(data, size=224, resize=256))


def test_num_classes_for_synthetic_data_and_too_few_for_a_data_set():
    from lsgd_jax.data import open_source

    source = open_source(TrainConfig(**TINY | dict(num_classes=7)), "validation")
    assert source.num_classes == 7
    assert source.get_batch(np.arange(40))["label"].max() < 7
    with pytest.raises(ValueError, match="--num-classes 5 is fewer than the 10 classes of "
                                         "fashion_mnist; use at least 10"):
        open_source(TrainConfig(data="fashion_mnist", num_classes=5), "validation")
    with pytest.raises(ValueError, match=r"--num-classes must be an integer in \[1, 1000000\]"):
        TrainConfig(num_classes=0)
