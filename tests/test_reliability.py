"""No lost progress: restores that fail are not damage, no silent restart, no false record,
no silent change of recipe, a lock that knows pid reuse, torn lines, a holder that lost
its workdir. Each case reproduces a way a run could lose its work with exit status 0."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    TINY_RUN,
    TRAINER,
    as_flags,
    run_trainer,
    small_tmpfs,
    subprocess_env,
    wait_for_record,
    write_lock,
)

from lsgd_jax.training.config import FREE_FIELDS, RESUME_FIELDS, TrainConfig
from lsgd_jax.training.metrics import current_records, eval_history, read_metrics
from lsgd_jax.training.workdir import LOCK_NAME, LockLostError

TINY, TINY_FLAGS = TINY_RUN, as_flags(TINY_RUN | dict(checkpoint_every_steps=2))

# TINY with a checkpoint every 2 steps and a one-evaluation median (fast).
BASE = TrainConfig(**TINY | dict(checkpoint_every_steps=2, median_evals=1))


def _files(root):
    """Every file under ``root`` with its bytes (to prove nothing was touched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory):
    """A run of BASE stopped after step 6: checkpoints 2, 4 and 6."""
    from lsgd_jax.training.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("stopped")
    train_and_evaluate(BASE.replace(num_steps=6), str(root / "run"), log=lambda m: None)
    return root / "run"


@pytest.fixture
def workdir(tmp_path, stopped_at_6):
    target = tmp_path / "w"
    shutil.copytree(stopped_at_6, target)
    return target


@pytest.fixture
def fast_retries(monkeypatch):
    from lsgd_jax.training import checkpoint

    monkeypatch.setattr(checkpoint, "RESTORE_BACKOFF_S", 0.01)


# ---------------------------------------------------------------- 1. errors that are not damage
@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"), OSError(errno.EACCES, "Permission denied"),
    MemoryError("out of memory"), RuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                               "trying to allocate 205 MiB"),
], ids=["EIO", "EACCES", "MemoryError", "xla_oom"])
def test_a_read_error_that_persists_stops_the_run_and_moves_nothing(
        workdir, monkeypatch, fast_retries, error):
    import orbax.checkpoint as ocp

    from lsgd_jax.training.checkpoint import CheckpointReadError
    from lsgd_jax.training.loop import train_and_evaluate

    calls = []

    def failing_restore(self, step, *args, **kwargs):
        calls.append(step)
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    before = _files(workdir)
    messages = []
    with pytest.raises(CheckpointReadError) as err:
        train_and_evaluate(BASE.replace(num_steps=8), str(workdir), log=messages.append)
    text = str(err.value)
    assert "\n" not in text
    assert f"checkpoint step 6 ({workdir / 'checkpoints' / '6'})" in text
    assert type(error).__name__ in text and "nothing was moved" in text
    assert calls == [6, 6, 6, 6]  # retried, and never fell back to an older step
    assert sum("retrying in" in m for m in messages) == 3
    assert _files(workdir) == before  # nothing moved, nothing written
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("corrupt")]


def test_a_transient_read_error_is_retried_and_the_run_resumes(workdir, monkeypatch, fast_retries):
    import orbax.checkpoint as ocp

    from lsgd_jax.training.loop import train_and_evaluate

    original, failures = ocp.CheckpointManager.restore, []

    def flaky_restore(self, step, *args, **kwargs):
        if len(failures) < 2:
            failures.append(step)
            raise OSError(errno.EIO, "Input/output error")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky_restore)
    messages = []
    summary = train_and_evaluate(BASE.replace(num_steps=8), str(workdir), log=messages.append)
    assert failures == [6, 6]
    assert any(m.startswith(f"resuming from {workdir / 'checkpoints'}/6 ") for m in messages)
    assert summary["step"] == 8
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6", "8"]


# ---------------------------------------------------------------- 2. no silent restart
def _flip(step_dir):
    chunk = max(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def test_all_checkpoints_damaged_refuses_then_restart_from_scratch_keeps_the_records(workdir):
    from lsgd_jax.training.checkpoint import NoUsableCheckpointError
    from lsgd_jax.training.loop import train_and_evaluate

    ckpts = workdir / "checkpoints"
    for step in ("2", "4", "6"):
        _flip(ckpts / step)
    records_before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(NoUsableCheckpointError) as err:
        train_and_evaluate(BASE.replace(num_steps=8), str(workdir), log=lambda m: None)
    text = str(err.value)
    assert "\n" not in text
    assert "corrupt-2, corrupt-4, corrupt-6" in text and str(ckpts) in text
    assert "--restart-from-scratch" in text and "new --workdir" in text
    assert (workdir / "metrics.jsonl").read_text() == records_before  # nothing recorded
    # A rerun refuses again (the moved checkpoints still count as progress).
    with pytest.raises(NoUsableCheckpointError):
        train_and_evaluate(BASE.replace(num_steps=8), str(workdir), log=lambda m: None)

    messages = []
    summary = train_and_evaluate(BASE.replace(num_steps=4), str(workdir), log=messages.append,
                                 restart_from_scratch=True)
    assert summary["step"] == 4
    text = (workdir / "metrics.jsonl").read_text()
    assert text.startswith(records_before)  # the old records are kept, untouched
    restart = [r for r in read_metrics(str(workdir)) if r["kind"] == "restart"]
    assert len(restart) == 1 and restart[0]["corrupt"] == ["corrupt-2", "corrupt-4", "corrupt-6"]
    # The attempt's own history starts at the restart.
    assert [r["step"] for r in current_records(str(workdir), "checkpoint")] == [2, 4]
    assert list(eval_history(str(workdir))) == [4]


def test_the_only_checkpoint_damaged_refuses(tmp_path):
    from lsgd_jax.training.checkpoint import NoUsableCheckpointError
    from lsgd_jax.training.loop import train_and_evaluate

    config = BASE.replace(keep_checkpoints=1, num_steps=4, keep_every_epochs=0)
    train_and_evaluate(config, str(tmp_path), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text("{torn")
    with pytest.raises(NoUsableCheckpointError, match="corrupt-4"):
        train_and_evaluate(config.replace(num_steps=6), str(tmp_path), log=lambda m: None)
    assert len(read_metrics(str(tmp_path), "start")) == 1


def test_a_finished_run_without_its_checkpoints_says_already_finished(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    config = BASE.replace(num_steps=2)
    first = train_and_evaluate(config, str(tmp_path), log=lambda m: None)
    shutil.rmtree(tmp_path / "checkpoints")
    before = (tmp_path / "metrics.jsonl").read_text()
    messages = []
    again = train_and_evaluate(config, str(tmp_path), log=messages.append)
    assert any(m.startswith("already finished at step 2 of 2") for m in messages), messages
    assert again["median_top1_error"] == first["median_top1_error"]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())


def test_an_attempt_that_saved_nothing_is_restarted_and_marked(tmp_path):
    """Records but no checkpoint ever (a crash before the first save): starting over
    loses nothing, so the run goes on, and says so."""
    from lsgd_jax.training.loop import train_and_evaluate
    from lsgd_jax.training.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write("start", 0)
    writer.write("train", 1, loss=7.0)
    messages = []
    summary = train_and_evaluate(BASE.replace(num_steps=2), str(tmp_path), log=messages.append)
    assert summary["step"] == 2
    assert any("stopped at step 1 before saving any checkpoint" in m for m in messages)
    assert [r["kind"] for r in read_metrics(str(tmp_path))][:3] == ["start", "train", "restart"]


# ---------------------------------------------------------------- 3. no record for a failed save
def test_a_save_that_did_not_complete_is_an_error_and_has_no_record(tmp_path, monkeypatch):
    """Orbax logs a failed save and goes on; here the save of step 4 writes nothing."""
    import orbax.checkpoint as ocp

    from lsgd_jax.training.checkpoint import CheckpointSaveError
    from lsgd_jax.training.loop import train_and_evaluate

    original = ocp.CheckpointManager.save

    def lossy_save(self, step, *args, **kwargs):
        if step == 4:
            return True  # as if the commit failed in the background
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", lossy_save)
    with pytest.raises(CheckpointSaveError) as err:
        train_and_evaluate(BASE.replace(num_steps=6), str(tmp_path), log=lambda m: None)
    text = str(err.value)
    assert "the checkpoint of step 4 was not saved: it is not on disk" in text
    assert "The latest complete checkpoint is step 2" in text and "\n" not in text
    assert [r["step"] for r in read_metrics(str(tmp_path), "checkpoint")] == [2]


@pytest.fixture
def small_disk(tmp_path):
    """A 3.3 MB tmpfs: room for two checkpoints of the tiny run, not three."""
    with small_tmpfs(tmp_path / "disk", "3300k") as mount:
        yield mount


@pytest.mark.slow
def test_a_disk_that_fills_mid_save_is_one_line_and_no_false_record(small_disk):
    workdir = small_disk / "w"
    result = run_trainer(["--workdir", str(workdir), *TINY_FLAGS], timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "no space left" in lines[0]
    complete = {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    recorded = {r["step"] for r in read_metrics(str(workdir), "checkpoint")}
    assert recorded and recorded <= complete, (recorded, complete)


# ---------------------------------------------------------------- 4. a changed recipe is refused
@pytest.mark.parametrize("change", [
    dict(bn_group_size=8), dict(dtype="bfloat16"), dict(grad_accum_steps=2),
    dict(base_lr=0.2), dict(reference_batch_size=128), dict(warmup="constant"),
    dict(warmup_epochs=2), dict(decay_epochs=(2.5,)), dict(decay_factor=0.5),
    dict(momentum=0.8), dict(nesterov=False), dict(weight_decay=5e-4), dict(seed=1),
    dict(momentum_form="eq10"), dict(momentum_correction=False), dict(color_jitter=0.4),
], ids=lambda c: next(iter(c)))
def test_resuming_with_another_recipe_is_refused_naming_the_field(workdir, change):
    from lsgd_jax.training.checkpoint import CheckpointMismatchError, check_resumable

    config = BASE.replace(**change)
    name, value = next(iter(change.items()))
    with pytest.raises(CheckpointMismatchError) as err:
        check_resumable(str(workdir / "checkpoints"), config.to_dict())
    saved = BASE.to_dict()[name]
    assert f"{name}: checkpoint has {saved!r}, this run has {config.to_dict()[name]!r}" in str(
        err.value)


def test_fields_that_do_not_change_the_math_may_change(workdir):
    from lsgd_jax.training.checkpoint import check_resumable

    config = BASE.replace(log_every_steps=7, eval_every_epochs=2, keep_checkpoints=5,
                          decode_threads=3, num_steps=10, checkpoint_every_steps=3,
                          epochs=4, median_evals=3)
    assert check_resumable(str(workdir / "checkpoints"), config.to_dict()) == 6
    # Every field is either free or part of the recipe; the recipe is the default.
    assert set(RESUME_FIELDS) | FREE_FIELDS == set(BASE.to_dict())
    assert {"bn_group_size", "dtype", "base_lr", "weight_decay", "seed"} <= set(RESUME_FIELDS)


def test_epochs_are_part_of_a_poly_recipe(workdir):
    """Poly decay runs to the last epoch: a longer run would change every rate."""
    from lsgd_jax.training.checkpoint import CheckpointMismatchError, _compare

    steps = BASE.to_dict()
    poly = BASE.replace(schedule="poly", end_lr=0.0).to_dict()
    _compare("w", steps, steps | {"epochs": 9})  # step decay: free
    with pytest.raises(CheckpointMismatchError, match="epochs: checkpoint has 3, this run has 9"):
        _compare("w", poly, poly | {"epochs": 9})


@pytest.mark.slow
def test_a_changed_recipe_exits_2_and_keeps_config_json(workdir):
    before = _files(workdir)
    flags = [*TINY_FLAGS, "--median-evals", "1", "--num-steps", "8", "--bn-group-size", "2"]
    result = run_trainer(["--workdir", str(workdir), *flags], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bn_group_size: checkpoint has 4, this run has 2" in result.stderr
    after = _files(workdir)
    assert {k: v for k, v in after.items() if k != "orbax.log"} == before


# ---------------------------------------------------------------- 6. a torn last line
def test_a_torn_last_line_is_ended_before_the_resumed_run_appends(workdir):
    from lsgd_jax.training.loop import train_and_evaluate

    path = workdir / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # a crash while writing
    messages = []
    train_and_evaluate(BASE.replace(num_steps=8), str(workdir), log=messages.append)
    assert sum("was cut short" in m for m in messages) == 1
    starts = read_metrics(str(workdir), "start")
    assert len(starts) == 2  # the resume's start record is on a line of its own
    lines = path.read_text().splitlines()
    assert '{"kind": "train", "step": 7, "lo' in lines


# ---------------------------------------------------------------- 7. a holder that lost its lock
def test_a_run_that_lost_its_lock_stops_and_writes_nothing_more(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    lock_path = tmp_path / LOCK_NAME

    def log(message):
        if message.startswith("step 3/"):  # another host takes the workdir over here
            write_lock(lock_path, host="elsewhere", pid=1, token="theirs")

    with pytest.raises(LockLostError, match="no longer holds the lock"):
        train_and_evaluate(BASE.replace(num_steps=8), str(tmp_path), log=log)
    records = read_metrics(str(tmp_path))
    assert max(r["step"] for r in records) == 3, records[-3:]
    # Step 2's save was complete before the takeover; its record, due after it, is not
    # written: the workdir is no longer this run's.
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] in ([], [2])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert json.loads(lock_path.read_text())["host"] == "elsewhere"  # theirs, left alone


@pytest.mark.slow
def test_a_frozen_holder_that_wakes_after_a_takeover_exits_2_silently(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen([sys.executable, TRAINER, "--workdir", workdir, *TINY_FLAGS,
                             "--epochs", "50", "--cpu-devices", "8"],
                            env=subprocess_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_record(workdir, proc, lambda r: r["kind"] == "train" and r["step"] >= 3)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        records = len(read_metrics(workdir))
        write_lock(tmp_path / LOCK_NAME, host="elsewhere", pid=1, token="theirs")
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: this run no longer holds the lock")
    assert len(read_metrics(workdir)) == records  # nothing after the takeover
