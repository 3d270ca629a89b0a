"""Every flag value is checked before anything starts: a bad one is one line, status 2.

The walk takes the numeric flags from the parsers themselves, so a flag added later is
fuzzed too, and fails here until its range is declared (and its valid values listed in
ALLOWED). Parsing and checking run in-process; a few cases run the real commands.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from lsgd_jax.cli.main import curves_parser, evaluate_parser, export_parser, predict_parser
from lsgd_jax.cli.train import _bool, build_parser, parse_flags, train_flags
from lsgd_jax.training.config import FREE_FIELDS, TrainConfig

VALUES = ("nan", "inf", "-1", "0", "1e30", "abc")
# The fuzzed values that are valid, per flag; every other one must be refused.
ALLOWED = {
    "train": {"--seed": {"0"}, "--checkpoint-every-steps": {"0"}, "--keep-every-epochs": {"0"},
              "--decode-workers": {"0"}, "--warmup-epochs": {"0"}, "--weight-decay": {"0"},
              "--label-smoothing": {"0"}, "--momentum": {"0"}, "--end-lr": {"0"},
              "--color-jitter": {"0"}, "--lighting": {"0"}, "--max-bad-fraction": {"0"},
              "--decay-epochs": {"0"}, "--process-id": {"0"}},
    "evaluate": {"--step": {"0"}, "--process-id": {"0"}},
    "export": {"--step": {"0"}, "--process-id": {"0"}},
    "predict": {},
    "curves": {},
}
PARSERS = {"train": lambda: build_parser("lsgd-jax train"), "evaluate": evaluate_parser,
           "export": export_parser, "predict": predict_parser, "curves": curves_parser}


def _required(command: str, where) -> list[str]:
    """The flags a command needs besides the one under test (nothing there is read)."""
    workdir = str(where / "w")
    return {"train": ["--workdir", workdir], "evaluate": ["--workdir", workdir],
            "export": ["--workdir", workdir, "--out", str(where / "m.msgpack")],
            "predict": ["--model", str(where / "m.msgpack"), str(where / "a.png")],
            "curves": [str(where / "w")]}[command]


def _check(command: str, argv: list[str]) -> int:
    """The command's parse-and-check step, as its main runs it; its exit status."""
    try:
        if command == "train":
            train_flags(argv, "lsgd-jax train")
        else:
            parse_flags(PARSERS[command](), argv)
    except SystemExit as e:
        return e.code
    return 0


def _flags(command: str, types) -> list[str]:
    parser = PARSERS[command]()
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.type in types]


def _numeric_flags(command: str) -> list[str]:
    """Every flag that parses its value as something other than text or a boolean."""
    parser = PARSERS[command]()
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.type not in (None, str, _bool) and not a.choices]


def test_the_walk_finds_the_numeric_flags():
    found = {command: _numeric_flags(command) for command in PARSERS}
    assert {"--epochs", "--decay-epochs", "--seed", "--cpu-devices", "--base-lr",
            "--heartbeat-timeout", "--max-image-size"} <= set(found["train"])
    assert {"--eval-batch-size", "--step", "--cpu-devices"} <= set(found["evaluate"])
    assert found["predict"] == ["--batch-size"]
    assert sum(map(len, found.values())) >= 50  # 53 when this was written
    for command, allowed in ALLOWED.items():  # no stale entries
        assert set(allowed) <= set(found[command]), command


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_numeric_flag_refuses_nonsense_in_one_line(command, tmp_path, capsys):
    base = _required(command, tmp_path)
    launch = (["--num-processes", "2", "--process-id", "1"]
              if command not in ("predict", "curves") else [])
    for flag in _numeric_flags(command):
        for value in VALUES:
            status = _check(command, [*base, flag, value])
            err = capsys.readouterr().err
            if value in ALLOWED[command].get(flag, ()):
                assert status == 0 and err == "", (flag, value, err)
                continue
            assert status == 2, (flag, value, status, err)
            assert "Traceback" not in err and "usage:" not in err, (flag, value, err)
            lines = err.splitlines()
            assert len(lines) == 1 and flag in lines[0], (flag, value, err)
            if lines[0].startswith("error: "):  # a range: the flag, the range and the value
                assert re.search(r"in [\[(]\S+, \S+[\])]", lines[0]), lines[0]
                assert "got " in lines[0], lines[0]
            else:  # argparse's refusal: its line and where the help is
                assert lines[0].endswith(f"(see lsgd-jax {command} --help)"), lines[0]
            if launch and flag not in launch:
                # The refusal depends on the flags alone: every process gives the same one.
                assert _check(command, [*base, flag, value, *launch]) == 2
                assert capsys.readouterr().err == err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", list(PARSERS))
def test_booleans_refuse_what_is_not_one(command, tmp_path, capsys):
    for flag in _flags(command, (_bool,)):
        for value in ("abc", "2", "nan"):
            assert _check(command, [*_required(command, tmp_path), flag, value]) == 2
            err = capsys.readouterr().err
            assert err == (f"lsgd-jax {command}: error: argument {flag}: expected true or "
                           f"false, got {value!r} (see lsgd-jax {command} --help)\n")
        assert _check(command, [*_required(command, tmp_path), flag, "false"]) == 0


# Each value got past the checks once: a traceback, a line naming no flag, or memory
# without bound.
FORMER_FAILURES = [
    ("train", ["--decay-epochs", "inf"], "each of --decay-epochs must be a number in [0, 100000]"),
    ("train", ["--decay-epochs", "nan"], "each of --decay-epochs must be a number"),
    ("train", ["--decay-epochs", "30,1e30"], "got (30, 1e+30)"),
    ("train", ["--seed", str(2**64)], f"--seed must be an integer in [0, 4294967295], got {2**64}"),
    ("train", ["--synthetic-examples", str(10**30)], "--synthetic-examples must be an integer in"),
    ("train", ["--image-size", "100000"], "--image-size must be an integer in [1, 65536]"),
    ("train", ["--image-size", "2048"], "--image-size 2048 is larger than --max-image-size 1024"),
    ("train", ["--epochs", "1e30"], "--epochs must be a number in (0, 100000], got 1e+30"),
    ("train", ["--median-evals", "1000000000000"], "--median-evals must be an integer in [1, 90]"),
    ("train", ["--eval-batch-size", "1000000000"], "--eval-batch-size must be an integer in"),
    ("train", ["--cpu-devices", "100000"], "--cpu-devices must be an integer in [1, 1024]"),
    ("train", ["--process-id", "2", "--num-processes", "2"], "--process-id must be an integer "
                                                            "in [0, 1] (below --num-processes 2)"),
    ("evaluate", ["--eval-batch-size", "1000000000000"], "--eval-batch-size must be an integer"),
    ("evaluate", ["--cpu-devices", "100000"], "--cpu-devices must be an integer in [1, 1024]"),
] + [("train", [flag, "1e30"], f"{flag} must be a number in ")
     for flag in ("--warmup-epochs", "--trust-coefficient", "--poly-power", "--end-lr",
                  "--base-lr", "--decay-factor", "--weight-decay")]


@pytest.mark.parametrize("command, flags, text", FORMER_FAILURES)
def test_the_values_that_once_got_through_are_refused(command, flags, text, tmp_path, capsys):
    assert _check(command, [*_required(command, tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and text in err and err.count("\n") == 1, err


@pytest.mark.parametrize("changes, text", [
    (dict(batch_size=64.0), "--batch-size must be an integer in [1, 1048576], got 64.0"),
    (dict(seed=True), "--seed must be an integer in [0, 4294967295], got True"),
    (dict(momentum=None), "--momentum must be a number in [0, 1), got None"),
    (dict(base_lr="0.1"), "--base-lr must be a number in (0, 1000], got '0.1'"),
    (dict(decay_epochs=(30, "60")), "each of --decay-epochs must be a number in [0, 100000]"),
])
def test_the_python_api_is_held_to_the_same_ranges(changes, text):
    """TrainConfig (and a checkpoint's config.json) gets values argparse would not give."""
    with pytest.raises(ValueError) as e:
        TrainConfig(**changes)
    assert text in str(e.value)


def test_a_larger_image_needs_the_flag_that_allows_it():
    assert TrainConfig(image_size=2048, max_image_size=2048).image_size == 2048
    with pytest.raises(ValueError, match="raise --max-image-size"):
        TrainConfig(image_size=1025)
    assert "max_image_size" in FREE_FIELDS  # a guard, not part of the recipe


def test_implausible_values_warn_in_one_line():
    assert TrainConfig().warnings() == []
    assert TrainConfig(base_lr=10, weight_decay=0.1, trust_coefficient=1,
                       poly_power=10).warnings() == []
    lines = TrainConfig(base_lr=50, weight_decay=0.5, trust_coefficient=2, poly_power=20,
                        end_lr=20, schedule="poly", batch_size=512).warnings()
    assert lines == [
        "warning: --base-lr 50 is above the usual range (at most 10); the run goes on with it",
        "warning: --poly-power 20 is above the usual range (at most 10); the run goes on "
        "with it",
        "warning: --end-lr 20 is above the usual range (at most 10); the run goes on with it",
        "warning: --trust-coefficient 2 is above the usual range (at most 1); the run goes "
        "on with it",
        "warning: --weight-decay 0.5 is above the usual range (at most 0.1); the run goes on "
        "with it"]


def test_the_training_command_prints_the_warning_and_goes_on(tmp_path, monkeypatch, capsys):
    import lsgd_jax.parallel.distributed
    import lsgd_jax.training.loop
    from lsgd_jax.cli.train import main

    runs = []
    monkeypatch.setattr(lsgd_jax.parallel.distributed, "initialize_distributed", lambda *a, **k: None)
    monkeypatch.setattr(lsgd_jax.training.loop, "train_and_evaluate", lambda *a, **k: runs.append(a))
    assert main(["--workdir", str(tmp_path / "w"), "--base-lr", "50"]) == 0
    assert len(runs) == 1 and runs[0][0].base_lr == 50
    assert ("warning: --base-lr 50 is above the usual range (at most 10)"
            in capsys.readouterr().out)


def test_a_refusal_comes_before_any_device_or_process(tmp_path, monkeypatch, capsys):
    import lsgd_jax.parallel.distributed
    from lsgd_jax.cli.main import main

    started = []
    monkeypatch.setattr(lsgd_jax.parallel.distributed, "use_cpu_devices", lambda n: started.append(n))
    monkeypatch.setattr(lsgd_jax.parallel.distributed, "initialize_distributed",
                        lambda *a, **k: started.append(a))
    for command, bad in (("train", "--seed"), ("evaluate", "--step"), ("export", "--step"),
                         ("predict", "--batch-size")):
        devices = ["--cpu-devices", "4"] if command != "predict" else []
        with pytest.raises(SystemExit) as e:
            main([command, *_required(command, tmp_path), *devices, bad, "-1"])
        assert e.value.code == 2 and bad in capsys.readouterr().err
    assert started == [] and not (tmp_path / "w").exists()


def test_the_plan_keeps_every_length_within_the_step_counter():
    from lsgd_jax.training.plan import make_plan

    kw = dict(batch_size=32, bn_group_size=4)
    big = dict(num_train_examples=32 * 10**6, num_devices=8)  # a million steps per epoch
    make_plan(TrainConfig(**kw, epochs=2000), **big)  # 2·10⁹ steps: within int32
    cases = [(dict(epochs=3000), "--epochs 3000 is 3000000000 steps at 1000000 steps per "
                                 "epoch (--batch-size 32); a run counts at most 2147483647"),
             (dict(epochs=1, warmup_epochs=3000, reference_batch_size=8), "--warmup-epochs 3000"),
             (dict(epochs=1, decay_epochs=(30, 3000)), "--decay-epochs 3000")]
    for changes, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)):
            make_plan(TrainConfig(**kw | changes), **big)


# ---------------------------------------------------------------- real commands
def _command(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args, line", [
    (["-m", "lsgd_jax", "train", "--decay-epochs", "inf"],
     "error: each of --decay-epochs must be a number in [0, 100000], got (inf,)"),
    (["-m", "lsgd_jax", "train", "--epochs", "abc"],
     "lsgd-jax train: error: argument --epochs: invalid float value: 'abc' (see lsgd-jax "
     "train --help)"),
    (["experiments/imagenet_resnet50.py", "--bogus", "1"],
     "imagenet_resnet50.py: error: unrecognized arguments: --bogus 1 (see "
     "imagenet_resnet50.py --help)"),
    (["experiments/evaluate.py", "--eval-batch-size", "1000000000000"],
     "error: --eval-batch-size must be an integer in [1, 1048576], got 1000000000000"),
    (["-m", "lsgd_jax", "predict", "--batch-size", "nan", "--model", "m", "a.png"],
     "lsgd-jax predict: error: argument --batch-size: invalid int value: 'nan' (see lsgd-jax "
     "predict --help)"),
], ids=["range", "not-a-number", "unknown-flag", "evaluate", "predict"])
def test_the_commands_refuse_in_one_line_before_anything_starts(args, line, tmp_path):
    workdir = tmp_path / "w"
    if "predict" not in args:
        args = [*args, "--workdir", str(workdir)]
    result = _command(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == line + "\n" and result.stdout == ""
    assert not workdir.exists()  # nothing written, not even the workdir
