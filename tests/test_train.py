"""The training loop end to end: train, evaluate, checkpoint, resume, preemption, bad input."""

import json
import os
import platform
import random
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from helpers import (
    ROOT,
    as_flags,
    complete_checkpoints,
    final_sha,
    run_trainer,
    small_tmpfs,
    start_trainer,
    subprocess_env,
    wait_for_record,
)

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import read_metrics

ENTRY = os.path.join(ROOT, "experiments", "imagenet_resnet50.py")

# A run small enough for a 2-core CPU: ResNet-8 on 32-pixel synthetic images,
# kn = 32 over 8 fake devices with BN groups of 4; 4 steps per epoch.
TINY = helpers.TINY_RUN
TINY_FLAGS = as_flags(TINY | dict(checkpoint_every_steps=2))
TOTAL_STEPS = helpers.TINY_RUN_STEPS
_run, _start, _wait_for = run_trainer, start_trainer, wait_for_record
_final_sha, _complete_checkpoints = final_sha, complete_checkpoints


def _launch_and_interrupt(command, env, workdir, interrupt):
    """Start ``command`` in its own session, ``interrupt(proc)`` after step 3; (status, output)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= 3)
        interrupt(proc)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


# ---------------------------------------------------------------- in process
def test_end_to_end_trains_evaluates_and_checkpoints(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    config = TrainConfig(**TINY, checkpoint_every_steps=0)
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["step"] == TOTAL_STEPS and not summary["preempted"]
    kinds = [r["kind"] for r in read_metrics(str(tmp_path))]
    for kind in ("start", "train", "eval", "checkpoint", "result"):
        assert kind in kinds
    evals = read_metrics(str(tmp_path), "eval")
    # Every epoch, and the median's five points one 90th of the run apart at its end.
    assert [e["step"] for e in evals] == [4, 8, 9, 10, 11, 12]
    assert all(e["count"] == 40 for e in evals)  # every validation example once
    train = read_metrics(str(tmp_path), "train")
    # the schedule was followed: k = 32/256 < 1, so kη from step 0 (no warmup), ×0.1 at epoch 2
    assert train[0]["lr"] == pytest.approx(0.1 * 32 / 256, rel=1e-6)
    assert train[-1]["lr"] == pytest.approx(0.1 * 32 / 256 * 0.1, rel=1e-6)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [4, 8, 12]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["batch_size"] == 32 and saved["plan"]["steps_per_epoch"] == 4
    assert summary["median_top1_error"] == pytest.approx(
        sorted(e["top1_error"] for e in evals[1:])[2])
    assert summary["median_num_evals"] == 5
    result = read_metrics(str(tmp_path), "result")[-1]
    assert result["median_top1_error"] == summary["median_top1_error"]
    assert result["median_eval_epochs"] == [2.0, 2.25, 2.5, 2.75, 3.0]
    assert os.listdir(tmp_path / "tensorboard")
    # The records name the environment that made them (a rerun is bit-identical only in it).
    env = read_metrics(str(tmp_path), "start")[-1]["environment"]
    assert env == saved["environment"]
    assert env["packages"]["jax"] == jax.__version__
    assert env["packages"]["jaxlib"] == jax.lib.__version__
    assert env["packages"]["numpy"] == np.__version__
    assert {"flax", "optax", "orbax-checkpoint"} <= set(env["packages"])
    assert env["python"].startswith(platform.python_version())
    assert env["cpu"]["model"] and isinstance(env["cpu"]["xla_flags"], list)
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40


def test_gradual_warmup_inside_the_loop_follows_the_schedule(tmp_path):
    """k = 4 (kn 32 against a reference of 8): every logged rate is goyal_schedule's."""
    from lsgd_jax.rules.schedules import goyal_schedule
    from lsgd_jax.training.loop import train_and_evaluate

    config = TrainConfig(**TINY | dict(reference_batch_size=8, base_lr=0.05, epochs=2,
                                       warmup_epochs=0.625, decay_epochs=(1.5,)))
    train_and_evaluate(config, str(tmp_path))
    lr = goyal_schedule(batch_size=32, steps_per_epoch=4, base_lr=0.05, reference_batch_size=8,
                        warmup_epochs=0.625, decay_epochs=(1.5,))
    logged = {r["step"]: r["lr"] for r in read_metrics(str(tmp_path), "train")}
    assert sorted(logged) == list(range(1, 9))
    for step, value in logged.items():  # the record of step s is the rate step s ran with
        assert value == pytest.approx(float(lr(step - 1)), rel=1e-6)
    # Independently: 0.05 → 0.2 over W = 2.5 steps (steps 0, 1, 2), ×0.1 from step 6.
    expected = [0.05, 0.05 + 0.06, 0.05 + 0.12, 0.2, 0.2, 0.2, 0.02, 0.02]
    assert [logged[s] for s in range(1, 9)] == pytest.approx(expected, rel=1e-6)
    start = read_metrics(str(tmp_path), "start")[-1]
    assert start["warmup_steps"] == 3


@pytest.mark.slow
def test_long_evaluations_on_cpu_devices_finish(tmp_path):
    """Hundreds of eval steps, each with an all-reduce, on 8 CPU devices: three runs in a
    row must all finish (an unbounded dispatch queue aborts in XLA's rendezvous)."""
    for attempt in range(3):
        result = _run(["--workdir", str(tmp_path / f"w{attempt}"), "--data", "synthetic",
                       "--model", "resnet20", "--image-size", "32", "--batch-size", "64",
                       "--bn-group-size", "8", "--num-steps", "1", "--dtype", "float32",
                       "--synthetic-examples", "640", "--synthetic-eval-examples", "25600",
                       "--eval-batch-size", "64", "--median-evals", "1"], timeout=300)
        # Without the bound this aborted (status 134) in about half the runs here: 400
        # queued steps hold more than the rendezvous's 40 s of work on 2 cores.
        assert result.returncode == 0, f"attempt {attempt}: {result.stderr[-3000:]}"
        evals = read_metrics(str(tmp_path / f"w{attempt}"), "eval")
        assert [e["count"] for e in evals] == [25600]  # 400 eval steps of 64 images


def test_config_errors_name_the_value():
    for changes, text in [
        (dict(batch_size=0), "--batch-size must be an integer in [1, 1048576], got 0"),
        (dict(warmup="linear"), "warmup must be one of"),
        (dict(model="vgg16"), "model must be one of"),
        (dict(decay_epochs=(60, 30)), "decay_epochs"),
        (dict(momentum=1.0), "--momentum must be a number in [0, 1), got 1.0"),
        (dict(data="cifar"), "data must be one of"),
        (dict(allreduce="tree"), "allreduce must be one of ('psum', 'ring'"),
    ]:
        with pytest.raises(ValueError) as err:
            TrainConfig(**(TINY | changes))
        assert text in str(err.value)


def test_help_explains_every_flag():
    from lsgd_jax.cli.train import build_parser

    parser = build_parser()
    assert [a.option_strings for a in parser._actions if not a.help] == []
    text = " ".join(parser.format_help().split())

    def help_of(flag):  # its line in the options list (the usage comes first)
        return text.split(f" {flag} ")[-1].split(" --")[0]

    assert help_of("--workdir").endswith("(required)")
    model = text.split(" --model ")[-1].split(" --batch-size ")[0]
    assert model.endswith("(default: resnet50, or resnet20 for --data fashion_mnist)")
    assert "(default: None)" not in help_of("--workdir") + model
    assert "{psum,ring,halving_doubling,binary_blocks,hierarchical}" in text
    for flag in ("--workdir", "--data", "--data-dir", "--model", "--image-size", "--batch-size",
                 "--bn-group-size", "--grad-accum-steps", "--epochs", "--num-steps", "--base-lr",
                 "--warmup", "--warmup-epochs", "--decay-epochs", "--momentum-form",
                 "--weight-decay", "--dtype", "--checkpoint-every-steps", "--seed",
                 "--coordinator-address", "--num-processes", "--process-id"):
        assert flag in parser.format_help()


def test_the_usage_names_the_command_that_was_run(capsys):
    """The experiments script and `lsgd-jax train` share the parser; each is named in its
    usage and in argparse's errors."""
    from lsgd_jax.cli.main import main as lsgd_jax
    from lsgd_jax.cli.train import main

    for run, usage in ((lambda: main(["--help"]), "usage: imagenet_resnet50.py "),
                       (lambda: lsgd_jax(["train", "--help"]), "usage: lsgd-jax train ")):
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(usage), out[:80]
    with pytest.raises(SystemExit) as e:
        lsgd_jax(["train"])
    assert e.value.code == 2
    assert ("lsgd-jax train: error: the following arguments are required: --workdir"
            in capsys.readouterr().err)


# ---------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _run(["--workdir", workdir, *TINY_FLAGS])
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_sha(workdir)


@pytest.mark.slow
def test_kill_9_then_rerun_is_bit_identical(tmp_path, reference_sha):
    workdir = str(tmp_path)
    kill_at = random.Random(os.urandom(8)).randint(3, TOTAL_STEPS - 2)
    proc = _start(["--workdir", workdir, *TINY_FLAGS])
    try:
        # Past step kill_at, with at least one complete checkpoint to resume from.
        _wait_for(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= kill_at
                  and _complete_checkpoints(workdir))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    complete = _complete_checkpoints(workdir)
    assert complete and complete[-1] < TOTAL_STEPS
    result = _run(["--workdir", workdir, *TINY_FLAGS])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = f"resuming from {os.path.join(workdir, 'checkpoints', str(complete[-1]))}"
    assert resumed in result.stdout, f"killed at step {kill_at}"
    assert _final_sha(workdir) == reference_sha, f"killed at step {kill_at}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_sigterm_or_ctrl_c_checkpoints_exits_0_and_resumes_bit_identical(tmp_path, reference_sha,
                                                                         signum):
    workdir = str(tmp_path)
    proc = _start(["--workdir", workdir, *TINY_FLAGS])
    try:
        _wait_for(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= 3)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out and "resume" in out and "Traceback" not in out
    if signum == signal.SIGINT:
        assert "Ctrl-C: saving a checkpoint" in out
    saved = [r["step"] for r in read_metrics(workdir, "checkpoint")]
    assert saved and saved[-1] < TOTAL_STEPS
    result = _run(["--workdir", workdir, *TINY_FLAGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {os.path.join(workdir, 'checkpoints', str(saved[-1]))}" in result.stdout
    assert _final_sha(workdir) == reference_sha


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags,text", [
    (["--batch-size", "0"], "--batch-size must be an integer in [1, 1048576], got 0"),
    (["--warmup", "linear"], "invalid choice: 'linear'"),
    (["--decay-epochs", "30,x"], "expected comma-separated epochs"),
    (["--batch-size", "36"], "--batch-size 36 does not split over"),
    (["--data", "fashion_mnist", "--data-dir", "/nonexistent/fmnist"], "/nonexistent/fmnist"),
])
def test_bad_flags_fail_fast_with_a_clear_error(tmp_path, flags, text):
    args = ["--workdir", str(tmp_path / "w"), *TINY_FLAGS, *flags]
    if "--data" in flags:
        args = ["--workdir", str(tmp_path / "w"), *flags, "--num-steps", "1"]
    result = _run(args, timeout=120)
    assert result.returncode == 2
    assert text in result.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints") or not os.listdir(
        tmp_path / "w" / "checkpoints")


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    workdir = str(tmp_path)
    first = _run(["--workdir", workdir, *TINY_FLAGS, "--num-steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt_dir = tmp_path / "checkpoints"
    before = sorted((str(p.relative_to(ckpt_dir)), p.stat().st_size) for p in ckpt_dir.rglob("*"))
    second = _run(["--workdir", workdir, *TINY_FLAGS, "--model", "resnet18"])
    assert second.returncode == 2
    assert "model: checkpoint has 'resnet8', this run has 'resnet18'" in second.stderr
    after = sorted((str(p.relative_to(ckpt_dir)), p.stat().st_size) for p in ckpt_dir.rglob("*"))
    assert after == before


# ---------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_processes_preempted_through_the_local_launcher_then_resumed(tmp_path):
    """2 processes × 2 devices (Gloo): SIGTERM to the launcher makes both save at the same
    step and exit 0; the rerun resumes and matches 1 process × 4 devices step by step."""
    launcher = os.path.join(ROOT, "launch", "local.sh")
    workdir, single = str(tmp_path / "two"), str(tmp_path / "one")
    env = subprocess_env(None) | {"PYTHON": sys.executable}
    command = ["bash", launcher, "2", "2", "--workdir", workdir, *TINY_FLAGS, "--num-steps", "8"]
    returncode, out = _launch_and_interrupt(command, env, workdir,
                                            lambda p: p.send_signal(signal.SIGTERM))
    assert returncode == 0, out[-3000:]
    assert "preempted: checkpoint saved at step" in out
    saved = _complete_checkpoints(workdir)
    assert saved and saved[-1] < 8
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {os.path.join(workdir, 'checkpoints', str(saved[-1]))}" in second.stdout
    ref = _run(["--workdir", single, *TINY_FLAGS, "--num-steps", "8"], devices=4)
    assert ref.returncode == 0, ref.stderr[-3000:]
    two = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}
    one = {r["step"]: r["loss"] for r in read_metrics(single, "train")}
    assert sorted(two) == sorted(one) == list(range(1, 9))
    for step in range(1, 9):
        # tolerance: float32 all-reduce over 2 processes vs 4 local devices, 8 steps
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    # The final parameters, BN averages and optimizer state agree too.
    import jax
    import numpy as np

    from lsgd_jax.training.checkpoint import Checkpoints

    states = []
    for w in (workdir, single):
        ckpts = Checkpoints(os.path.join(w, "checkpoints"))
        try:
            states.append(ckpts.read_state(8))
        finally:
            ckpts.close()
    leaves_two = jax.tree_util.tree_flatten_with_path(states[0])[0]
    leaves_one = jax.tree.leaves(states[1])
    assert len(leaves_two) == len(leaves_one) > 20
    assert {str(p[0]) for p, _ in leaves_two} >= {"['params']", "['opt_state']",
                                                 "['batch_stats']"}
    for (path, a), b in zip(leaves_two, leaves_one):
        # tolerance: as for the losses, carried into the state over 8 steps
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_unfinished_checkpoints_are_ignored_and_cleaned(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    config = TrainConfig(**TINY | dict(num_steps=4))
    train_and_evaluate(config, str(tmp_path))
    # A save cut short by a crash: orbax's temporary name, half-written contents.
    unfinished = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "garbage").write_bytes(b"\0" * 100)
    lines = []
    summary = train_and_evaluate(config.replace(num_steps=6), str(tmp_path), log=lines.append)
    assert any(f"resuming from {tmp_path / 'checkpoints' / '4'}" in line for line in lines)
    assert summary["step"] == 6
    assert not unfinished.exists()
    assert _complete_checkpoints(str(tmp_path))[-1] == 6


def _past_the_range_check(config, **values):
    """``config`` with ``values`` set without the declared ranges' check (which refuses them
    at the flag), to reach the trainer's non-finite guard the way a diverging run would."""
    for name, value in values.items():
        object.__setattr__(config, name, value)
    return config


def test_non_finite_loss_stops_the_run_without_saving_it(tmp_path):
    import jax
    import numpy as np

    from lsgd_jax.training.checkpoint import Checkpoints
    from lsgd_jax.training.loop import NonFiniteError, train_and_evaluate

    # A rate of 1e12 blows the loss up within a few steps. The declared range of --base-lr
    # refuses it at the flag; what is tested here is the trainer's own guard, which must also
    # hold for a run that diverges at a rate inside the range, so the value is set past it.
    config = _past_the_range_check(TrainConfig(**TINY | dict(checkpoint_every_steps=1)),
                                   base_lr=1e12)
    with pytest.raises(NonFiniteError, match=r"non-finite loss, gradient or updated state at "
                                              r"step \d+ "
                                              r"\(learning rate 1\.25e\+11"):
        train_and_evaluate(config, str(tmp_path))
    steps = _complete_checkpoints(str(tmp_path))
    assert steps  # the finite steps before the blow-up were saved
    ckpts = Checkpoints(str(tmp_path / "checkpoints"))
    try:
        for step in steps:
            for leaf in jax.tree.leaves(ckpts.read_state(step)):
                assert np.all(np.isfinite(np.asarray(leaf))), step
    finally:
        ckpts.close()


@pytest.mark.slow
def test_trains_on_a_real_tfds_imagenet_data_set(tmp_path):
    """The ImageNet path end to end: ArrayRecord random access, JPEG/CMYK/PNG decoding,
    bad files replaced, uint8 batches normalized on device, every validation image once."""
    pytest.importorskip("tensorflow_datasets")
    from tiny_imagenet import BUILDER, NUM, build

    from lsgd_jax.training.loop import train_and_evaluate

    data_dir = build(tmp_path / "tfds")
    config = TrainConfig(data="imagenet", data_dir=data_dir, tfds_name=BUILDER, model="resnet20",
                         image_size=16, batch_size=16, bn_group_size=2, eval_batch_size=16,
                         dtype="float32", epochs=2, warmup_epochs=0, decay_epochs=(),
                         max_bad_fraction=0.2, decode_threads=2, log_every_steps=1)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["step"] == 2 * (NUM // 16)
    evals = read_metrics(str(tmp_path / "run"), "eval")
    assert len(evals) >= 2 and all(e["count"] == NUM for e in evals)
    assert all(r["loss"] == r["loss"] for r in read_metrics(str(tmp_path / "run"), "train"))
    # A data set of another name is refused when resuming.
    with pytest.raises(ValueError, match="tfds_name: checkpoint has 'lsgd_tiny_imagenet'"):
        train_and_evaluate(config.replace(tfds_name="imagenet2012", data_dir=data_dir),
                           str(tmp_path / "run"))


def test_trains_on_a_host_without_tensorflow(tmp_path):
    """GPU hosts may lack TensorFlow, tfds and grain: the synthetic path must not need them."""
    code = (
        "import sys\n"
        "for name in ('tensorflow', 'tensorflow_datasets', 'grain'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "from lsgd_jax.cli.train import main\n"
        f"sys.exit(main(['--workdir', {str(tmp_path)!r}, *{TINY_FLAGS!r}, '--num-steps', '2',"
        " '--cpu-devices', '2']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(None), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(tmp_path), "checkpoint")] == [2]


# ---------------------------------------------------------------- damaged checkpoints
def _largest_chunk(step_dir):
    chunks = [p for p in step_dir.glob("state/ocdbt.process_0/d/*")]
    return max(chunks, key=lambda p: p.stat().st_size)


def _flip_bit(step_dir):
    path = _largest_chunk(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "SHA-256"


def _truncate(step_dir):
    path = _largest_chunk(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "checkpoint step 6 is damaged"


def _delete(name):
    def damage(step_dir):
        (step_dir / "state" / name).unlink()
        return name

    return damage


def _empty(step_dir):
    import shutil

    for child in step_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return "checkpoint step 6 is damaged"


def _garbage(item):
    def damage(step_dir):
        (step_dir / item / "metadata").write_text("{not json")
        return f"{item}/metadata): not valid JSON"

    return damage


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run of TINY stopped after step 6 (checkpoints 2, 4, 6), and the state hash of an
    uninterrupted run at step 8."""
    from lsgd_jax.training.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("six")
    config = TrainConfig(**TINY | dict(checkpoint_every_steps=2, median_evals=1))
    train_and_evaluate(config.replace(num_steps=6), str(root / "run"))
    train_and_evaluate(config.replace(num_steps=8), str(root / "ref"))
    ref8 = [r for r in read_metrics(str(root / "ref"), "checkpoint") if r["step"] == 8]
    return config, root / "run", ref8[-1]["state_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [
    _flip_bit, _truncate, _delete("manifest.ocdbt"), _delete("_METADATA"), _empty,
    _garbage("meta"), _garbage("data"),
], ids=["bit_flip", "truncated_chunk", "no_manifest", "no_METADATA", "empty_step",
        "bad_meta", "bad_data"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_resumed(
        tmp_path, six_steps, damage):
    import shutil

    from lsgd_jax.training.loop import train_and_evaluate

    config, run, ref_sha = six_steps
    workdir = tmp_path / "w"
    shutil.copytree(run, workdir)
    ckpts = workdir / "checkpoints"
    expected = damage(ckpts / "6")
    before = sorted(str(p.relative_to(ckpts / "6")) for p in (ckpts / "6").rglob("*"))
    messages = []
    summary = train_and_evaluate(config.replace(num_steps=8), str(workdir), log=messages.append)
    text = "\n".join(messages)
    assert "checkpoint step 6 is damaged" in text and expected in text, text
    assert f"Moved it to {ckpts / 'corrupt-6'}" in text
    assert f"resuming from {ckpts / '4'}" in text
    # Nothing was deleted: the damaged step is kept aside, file for file.
    after = sorted(str(p.relative_to(ckpts / "corrupt-6"))
                   for p in (ckpts / "corrupt-6").rglob("*"))
    assert after == before
    # The run redid steps 5 and 6 and ends bit-identical to the uninterrupted one.
    assert summary["step"] == 8
    final = [r for r in read_metrics(str(workdir), "checkpoint") if r["step"] == 8]
    assert final[-1]["state_sha256"] == ref_sha


def test_no_checkpoint_says_it_starts_from_scratch(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    messages = []
    train_and_evaluate(TrainConfig(**TINY | dict(num_steps=1, median_evals=1)), str(tmp_path),
                       log=messages.append)
    assert any("no checkpoint in" in m and "starting from scratch" in m for m in messages)
    # No minute of silence: the compilation is announced and the first step timed.
    assert "compiling the train step (the first step includes it)…" in messages
    assert any(m.startswith("first step done in ") for m in messages)
    start = next(m for m in messages if m.startswith("kn=32"))
    assert "on 8 devices in 1 process, 4 images per device in 1 microbatch;" in start


def test_an_overflowing_rate_stops_before_any_bad_checkpoint_and_a_sane_rerun_works(tmp_path):
    """--base-lr 1e38 --reference-batch-size 1 --warmup none: the rate overflows at the
    first step; nothing non-finite is saved, and a rerun with a sane rate trains on."""
    from lsgd_jax.training.checkpoint import Checkpoints
    from lsgd_jax.training.loop import NonFiniteError, train_and_evaluate

    bad = _past_the_range_check(
        TrainConfig(**TINY | dict(reference_batch_size=1, warmup="none",
                                  checkpoint_every_steps=1, num_steps=3, median_evals=1)),
        base_lr=1e38)
    with pytest.raises(NonFiniteError, match="at step 1 "):
        train_and_evaluate(bad, str(tmp_path))
    assert _complete_checkpoints(str(tmp_path)) == []
    sane = bad.replace(base_lr=0.1, reference_batch_size=256, warmup="gradual")
    summary = train_and_evaluate(sane, str(tmp_path))
    assert summary["step"] == 3
    ckpts = Checkpoints(str(tmp_path / "checkpoints"))
    try:
        import jax
        import numpy as np

        assert all(np.all(np.isfinite(np.asarray(x)))
                   for x in jax.tree.leaves(ckpts.read_state(3)))
    finally:
        ckpts.close()


# ---------------------------------------------------------------- one run per workdir, Ctrl-C
def _outside_checkpoints(root):
    return {str(p) for p in root.rglob("*") if "checkpoints" not in p.relative_to(root).parts}


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_refuses_at_once_and_the_first_finishes(tmp_path):
    workdir = str(tmp_path)
    first = _start(["--workdir", workdir, *TINY_FLAGS])
    try:
        _wait_for(workdir, first, lambda r: r["kind"] == "train" and r["step"] >= 2)
        files_before = _outside_checkpoints(tmp_path)
        config_before = (tmp_path / "config.json").read_bytes()
        second = _run(["--workdir", workdir, *TINY_FLAGS], timeout=120)
        assert second.returncode == 2
        assert "is in use by another run (host " in second.stderr
        assert f"pid {first.pid}" in second.stderr and len(second.stderr.splitlines()) == 1
        # The second run touched nothing: no file gone, the config and the lock still the
        # first run's. (checkpoints/ is left out: the first run rotates its own saves there.)
        assert files_before <= _outside_checkpoints(tmp_path)
        assert (tmp_path / "config.json").read_bytes() == config_before
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == first.pid
        out, _ = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    assert _complete_checkpoints(workdir)[-1] == TOTAL_STEPS
    assert not os.path.exists(os.path.join(workdir, ".lock"))


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    workdir = str(tmp_path)
    proc = _start(["--workdir", workdir, *TINY_FLAGS, "--epochs", "50"])
    try:
        _wait_for(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "aborted by a second Ctrl-C" in out and "Traceback" not in out


@pytest.mark.parametrize("damage, text", [
    (lambda b: b[: len(b) // 2], "EOFError"),
    (lambda b: b"this is not gzip data at all", "BadGzipFile"),
], ids=["truncated", "garbage"])
def test_a_damaged_fashion_mnist_file_is_named(tmp_path, damage, text):
    import numpy as np

    from lsgd_jax.data.fashion_mnist import FILES, write_idx

    images = np.zeros((20, 28, 28), np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    for split in ("train", "validation"):
        for name, array in zip(FILES[split], (images, labels)):
            write_idx(str(tmp_path / name), array)
    bad = tmp_path / FILES["train"][0]
    bad.write_bytes(damage(bad.read_bytes()))
    result = _run(["--workdir", str(tmp_path / "w"), "--data", "fashion_mnist", "--data-dir",
                   str(tmp_path), "--batch-size", "8", "--bn-group-size", "1", "--num-steps",
                   "1"], timeout=120)
    assert result.returncode == 2
    assert f"error: {bad} is damaged ({text}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_warmup_longer_than_the_run_is_reported(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    messages = []
    config = TrainConfig(**TINY | dict(reference_batch_size=8, warmup_epochs=5, num_steps=1,
                                       median_evals=1))
    train_and_evaluate(config, str(tmp_path), log=messages.append)
    assert any("warning: the warmup (20 steps, --warmup-epochs 5) is longer than the run "
               "(12 steps, --epochs 3)" in m for m in messages), messages


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    config = TrainConfig(**TINY | dict(num_steps=2, median_evals=1))
    said = []
    first = train_and_evaluate(config, str(tmp_path), log=said.append)
    # A line for each checkpoint saved, and a last line that names the outputs.
    assert [m for m in said if m.startswith("checkpoint saved: step ")] == [
        m for m in said if m.startswith("checkpoint saved: step 2")], said
    assert len([m for m in said if m.startswith("checkpoint saved: ")]) == 1, said
    assert said[-1].startswith(f"outputs in {tmp_path}: metrics.jsonl, config.json, "
                               "checkpoints/, tensorboard/. Curves: lsgd-jax curves"), said[-1]
    # Only the files the README lists (orbax.log only when a library logged something).
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json", "metrics.jsonl",
                                            "tensorboard"]
    before = (tmp_path / "metrics.jsonl").read_text()
    messages = []
    again = train_and_evaluate(config, str(tmp_path), log=messages.append)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert any(m.startswith("already finished at step 2 of 2") for m in messages), messages
    assert not any("resum" in m for m in messages), messages  # finished: nothing to resume
    assert again["median_top1_error"] == first["median_top1_error"]


def test_a_bad_value_is_one_line_without_the_usage(tmp_path):
    result = _run(["--workdir", str(tmp_path / "w"), "--base-lr", "-1"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --base-lr must be a number in (0, 1000], got -1.0"
    assert not (tmp_path / "w").exists()


def test_checkpoint_records_are_written_once_the_save_is_on_disk(tmp_path, monkeypatch):
    """A save still in progress has no record; once committed it has, with its hash."""
    from lsgd_jax.training import checkpoint
    from lsgd_jax.training.loop import train_and_evaluate

    seen = []
    original = checkpoint.Checkpoints.save

    def save_and_look(self, step, state, **kwargs):
        original(self, step, state, **kwargs)
        # The record of this step must not exist yet, whatever the save's progress.
        seen.append((step, [r["step"] for r in read_metrics(str(tmp_path), "checkpoint")]))

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save_and_look)
    train_and_evaluate(TrainConfig(**TINY | dict(num_steps=6, checkpoint_every_steps=2,
                                                 median_evals=1)), str(tmp_path))
    assert [s for s, _ in seen] == [2, 4, 6]
    for step, recorded in seen:
        assert step not in recorded
    records = read_metrics(str(tmp_path), "checkpoint")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:  # written after the checkpoint was complete on disk
        commit = tmp_path / "checkpoints" / str(r["step"]) / "commit_success.txt"
        assert r["time"] >= os.stat(commit).st_mtime - 0.002, r["step"]


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout(tmp_path):
    """Two hand-launched processes with --heartbeat-timeout 5: kill -9 one, and the other
    ends within seconds (JAX's default would wait 100 s), leaving a resumable workdir."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path)
    procs = [subprocess.Popen(
        [sys.executable, ENTRY, "--workdir", workdir, *TINY_FLAGS, "--epochs", "50",
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--cpu-devices", "2", "--heartbeat-timeout", "5"],
        env=subprocess_env(None), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        _wait_for(workdir, procs[0], lambda r: r["kind"] == "train" and r["step"] >= 2)
        procs[1].kill()
        start = time.time()
        procs[0].wait(timeout=60)
        assert time.time() - start < 30
        assert procs[0].returncode != 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Whatever the lock's state (released by process 0, or stale), a rerun goes on.
    result = _run(["--workdir", workdir, *TINY_FLAGS, "--num-steps", "6"], devices=4)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.2 MB file system (tmpfs), where root may mount one; skipped elsewhere."""
    with small_tmpfs(tmp_path / "disk", "1200k") as mount:
        yield mount


def test_a_disk_too_small_for_a_checkpoint_is_one_clear_error_every_time(tiny_disk):
    args = ["--workdir", str(tiny_disk / "w"), *TINY_FLAGS]
    for _ in range(2):  # the first run and the rerun alike
        result = _run(args, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: not enough free space for a checkpoint in --workdir {tiny_disk / 'w'}: ")
        assert "a checkpoint needs about" in lines[0]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_two_processes_at_one_checkpoint(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the launcher and both processes at once:
    they agree on one step, both save it, and everything exits 0."""
    launcher = os.path.join(ROOT, "launch", "local.sh")
    workdir = str(tmp_path)
    env = subprocess_env(None) | {"PYTHON": sys.executable}
    command = ["bash", launcher, "2", "2", "--workdir", workdir, *TINY_FLAGS, "--epochs", "50"]
    # SIGINT to the whole process group, as a terminal does.
    returncode, out = _launch_and_interrupt(command, env, workdir,
                                            lambda p: os.killpg(p.pid, signal.SIGINT))
    assert returncode == 0, out[-3000:]
    assert "preempted: checkpoint saved at step" in out
    saved = _complete_checkpoints(workdir)
    step = int(out.split("preempted: checkpoint saved at step ")[1].split(";")[0])
    assert saved and saved[-1] == step
