"""What a new user meets first: the commands' help, a missing extra, the lines a run
prints (top-1 figures, checkpoints, its outputs), and a data set trained on the paper's
defaults."""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import ROOT, env_without

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.metrics import MetricsWriter


def _python(env, *args, timeout=120):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _one_error_line(result, install):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert install in lines[0], lines[0]
    return lines[0]


def _fake_run(path, *, result=True):
    """A workdir with the records of a 2-epoch run of 117 steps per epoch."""
    path.mkdir()
    records = [{"kind": "train", "step": s, "epoch": s / 117, "lr": 0.1, "loss": 1.0 / s,
                "top1_error": 0.3} for s in range(20, 235, 20)]
    eval_steps = [117, 224, 226, 229, 231, 234]
    errors = [0.342, 0.165, 0.168, 0.166, 0.170, 0.1673]
    records += [{"kind": "eval", "step": s, "epoch": s / 117, "top1_error": e}
                for s, e in zip(eval_steps, errors)]
    if result:
        records.append({"kind": "result", "step": 234, "median_top1_error": 0.1673,
                        "median_num_evals": 5,
                        "median_eval_epochs": [round(s / 117, 4) for s in eval_steps[1:]]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------- missing extras
def test_curves_without_the_plot_extra_is_one_line_naming_the_install(tmp_path):
    run = _fake_run(tmp_path / "run")
    env = env_without(tmp_path, "matplotlib")
    for command in (["-m", "lsgd_jax", "curves", run],
                    [os.path.join(ROOT, "experiments", "plot_curves.py"), run]):
        line = _one_error_line(_python(env, *command), 'pip install -e ".[plot]"')
        assert "matplotlib" in line
    assert not os.path.exists(os.path.join(run, "curves.png"))
    # The library's own entry point says the same, as an error the caller can catch.
    code = ("import sys; from lsgd_jax.training.extras import MissingExtraError; "
            "from lsgd_jax.artifacts.plotting import plot_runs\n"
            "try:\n    plot_runs([sys.argv[1]])\n"
            "except MissingExtraError as e:\n    print(e)")
    result = _python(env, "-c", code, run)
    assert result.returncode == 0 and 'pip install -e ".[plot]"' in result.stdout, (
        result.stdout + result.stderr)


def test_imagenet_without_the_data_extra_is_one_line_before_anything_starts(tmp_path):
    env = env_without(tmp_path, "tensorflow_datasets")
    workdir = tmp_path / "w"
    result = _python(env, "-m", "lsgd_jax", "train", "--workdir", str(workdir), "--data",
                     "imagenet", "--cpu-devices", "2")
    line = _one_error_line(result, 'pip install -e ".[data]"')
    assert "tensorflow_datasets" in line and "--data imagenet" in line
    assert not workdir.exists()
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (manual / name).write_bytes(b"")
    result = _python(env, os.path.join(ROOT, "experiments", "prepare_imagenet.py"),
                     "--manual-dir", str(manual), "--data-dir", str(tmp_path / "tfds"))
    assert "preparing ImageNet needs tensorflow_datasets" in _one_error_line(
        result, 'pip install -e ".[data]"')
    # ImageNet from its folders needs no tfds: the same check lets it through.
    folders = tmp_path / "imagenet"
    (folders / "train" / "n01440764").mkdir(parents=True)
    result = _python(env, "-c", "import sys; from lsgd_jax.training.extras import check_for_data; "
                     "check_for_data('imagenet', sys.argv[1]); print('ok')", str(folders))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # With the extra there (it is, for the tests), the same check passes.
    from lsgd_jax.training.extras import check_for_data

    check_for_data("imagenet")
    check_for_data("fashion_mnist")


def test_the_last_line_names_the_tensorboard_install_only_when_the_viewer_is_missing(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("")
    code = ("import sys; from lsgd_jax.training.loop import outputs_line; "
            "print(outputs_line(sys.argv[1]))")
    without = _python(env_without(tmp_path, "tensorboard"), "-c", code, str(workdir))
    assert without.returncode == 0, without.stderr
    assert f'tensorboard --logdir {workdir / "tensorboard"} (after pip install -e ' \
           '".[tensorboard]")' in without.stdout
    present = _python(env_without(tmp_path, "nothing_blocked"), "-c",
                      code.replace("import sys;", "import sys, types; "
                                   "sys.modules['tensorboard'] = types.ModuleType('t'); "
                                   "import importlib.machinery as m; sys.modules['tensorboard']"
                                   ".__spec__ = m.ModuleSpec('tensorboard', None);"),
                      str(workdir))
    assert present.returncode == 0, present.stderr
    assert "tensorboard]" not in present.stdout and "tensorboard --logdir" in present.stdout


def test_tensorboardx_missing_is_one_warning_naming_the_install(tmp_path):
    code = ("import sys; from lsgd_jax.training.metrics import MetricsWriter; "
            "MetricsWriter(sys.argv[1]).write('train', 1, loss=1.0)")
    result = _python(env_without(tmp_path, "tensorboardX"), "-c", code, str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: tensorboardX is not installed")
    assert "pip install -e ." in lines[0]
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


# ---------------------------------------------------------------- top-1: error or accuracy
def _says_error_or_accuracy(line: str) -> None:
    """Every rate of ``line`` (a percentage with decimals, as top-1 figures are printed) is
    named an error or an accuracy next to it."""
    figures = list(re.finditer(r"\d+\.\d+%", line))
    assert figures, line
    for m in figures:
        around = line[max(0, m.start() - 15):m.end() + 15]
        assert "error" in around or "accuracy" in around, f"{m.group()} in {line!r}"


def _fake_live_run(tmp_path, log):
    plan = types.SimpleNamespace(global_batch_size=512, steps_per_epoch=117, total_steps=234,
                                 eval_steps=(117, 234))
    return types.SimpleNamespace(plan=plan, schedule=lambda step: 0.2, log=log,
                                 workdir=str(tmp_path), config=TrainConfig(median_evals=1),
                                 ckpts=types.SimpleNamespace(latest_step=lambda: None))


def test_every_printed_top1_figure_says_it_is_an_error(tmp_path):
    from lsgd_jax.training.loop import _log_eval, _result
    from lsgd_jax.training.recording import LogWindow

    lines = []
    run = _fake_live_run(tmp_path, lines.append)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    window = LogWindow(run, writer, 0)
    window.add(20, {"loss": np.float32(0.5), "top1_error": np.float32(0.7795),
                    "finite": np.bool_(True)})
    window.emit(20)
    _log_eval(run, writer, 234, {"top1_error": 0.1673, "top5_error": 0.01, "loss": 0.4,
                                 "count": 10000})
    _result(run, writer, 234, False)
    train, evaluation, result = (next(line for line in lines if line.startswith(p))
                                 for p in ("step 20/234", "eval at step", "done: "))
    assert "top-1 error 77.95%" in train and "top1 " not in train
    for line in (train, evaluation, result):
        _says_error_or_accuracy(line)
    # The same name in TensorBoard: every top-1 tag is an error.
    tags = []
    tb = types.SimpleNamespace(add_scalar=lambda tag, value, step: tags.append(tag),
                               flush=lambda: None, close=lambda: None)
    os.makedirs(tmp_path / "tb")
    writer = MetricsWriter(str(tmp_path / "tb"), tensorboard=False)
    writer._tb = tb
    window = LogWindow(types.SimpleNamespace(**{**vars(run), "log": lambda m: None}), writer, 0)
    window.add(1, {"loss": np.float32(0.5), "top1_error": np.float32(0.5),
                   "finite": np.bool_(True)})
    window.emit(1)
    _log_eval(run, writer, 117, {"top1_error": 0.2, "top5_error": 0.01, "loss": 0.4,
                                 "count": 10})
    top1 = [t for t in tags if "top1" in t]
    assert top1 == ["train/top1_error", "eval/top1_error"], tags


def test_the_evaluate_and_export_lines_say_error():
    import inspect

    from lsgd_jax.cli import main as commands

    source = inspect.getsource(commands)
    for pattern in re.findall(r'f"[^"]*%[^"]*"', source):
        if "top" in pattern or "figure" in pattern:
            assert "error" in pattern, pattern


# ---------------------------------------------------------------- help
def test_lsgd_jax_help_lists_each_command_with_what_it_does(capsys):
    from lsgd_jax.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", *COMMANDS):
        line = next((t for t in out.splitlines() if t.split()[:1] == [name]), None)
        assert line is not None, f"{name} has no line in:\n{out}"
        assert len(line.split()) >= 5, line  # the name and what it does
    assert main(["nonsense"]) == 2
    assert "lsgd-jax --help" in capsys.readouterr().err


def test_train_help_puts_the_essentials_first_with_a_short_usage_and_typed_defaults(capsys):
    from lsgd_jax.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    assert usage.startswith("usage: lsgd-jax train --workdir") and len(usage.splitlines()) <= 2
    groups = re.findall(r"^(\S[^\n]*):\n", text, flags=re.M)
    assert groups[:2] == ["options", "essentials"], groups
    assert {"run", "data", "model", "schedule", "optimizer"} <= set(groups)
    essentials = text.split("\nessentials:\n")[1].split("\n\n")[0]
    flags = re.findall(r"^  (--[\w-]+)", essentials, flags=re.M)
    assert flags == ["--workdir", "--data", "--model", "--batch-size", "--epochs"], flags
    flat = " ".join(text.split())
    assert "(default: 30,60,80)" in flat and "(30, 60, 80)" not in flat
    assert "Nesterov momentum (true/false) (default: true)" in flat
    assert "(default: True)" not in flat and "(default: 0.0)" not in flat


def test_evaluate_help_says_what_it_writes_and_counts_devices_in_words(capsys):
    from lsgd_jax.cli.main import evaluate_parser, evaluating_line

    text = " ".join(evaluate_parser().format_help().split())
    assert "Writes one thing: an `eval` record" in text and "metrics.jsonl" in text
    assert "read only" not in text and "without changing it" not in text
    assert evaluating_line("w", 4, 1).endswith("on 1 device")
    assert evaluating_line("w", 4, 8).endswith("on 8 devices")


# ---------------------------------------------------------------- the paper's defaults
def test_a_small_data_set_on_the_papers_defaults_says_so_in_one_line(tmp_path, monkeypatch,
                                                                     capsys):
    import lsgd_jax.parallel.distributed
    import lsgd_jax.training.loop
    from lsgd_jax.cli.train import build_parser, given_flags, main, recipe_notice

    monkeypatch.setattr(lsgd_jax.parallel.distributed, "initialize_distributed", lambda *a, **k: None)
    monkeypatch.setattr(lsgd_jax.training.loop, "train_and_evaluate", lambda *a, **k: None)
    w = str(tmp_path / "w")
    assert main(["--workdir", w, "--data", "fashion_mnist"]) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if line.startswith("note: ")]
    assert len(notes) == 1 and out[0] == notes[0], out
    assert ("training the paper's ImageNet recipe on --data fashion_mnist: 90 epochs with "
            "decays at epochs 30,60,80 (--epochs not given); resnet20 (--model not given"
            in notes[0])
    # Given --epochs and --model (the README's command), or abbreviated: no note.
    parser = build_parser()
    for argv in (["--workdir", w, "--data", "fashion_mnist", "--epochs", "2", "--model",
                  "resnet20"], ["--workdir", w, "--data=fashion_mnist", "--epoch=2",
                                "--mod", "resnet8"]):
        given = given_flags(parser, argv)
        assert {"epochs", "model", "data", "workdir"} <= given
        assert recipe_notice(TrainConfig(data="fashion_mnist"), given) == ""
    # --epochs given: the data set's own model is no ImageNet recipe; ResNet-50 would be.
    assert recipe_notice(TrainConfig(data="fashion_mnist", epochs=2), {"epochs", "data"}) == ""
    import lsgd_jax.training.config as config_module

    monkeypatch.setitem(config_module.DEFAULT_MODELS, "fashion_mnist",
                        "resnet50")
    paper_model = recipe_notice(TrainConfig(data="fashion_mnist", epochs=2), {"epochs", "data"})
    assert "resnet50 (--model not given)" in paper_model
    assert "--epochs not given" not in paper_model
    # The paper's own run (ImageNet, or the synthetic stand-in) needs no note.
    assert recipe_notice(TrainConfig(data="imagenet"), {"data"}) == ""
    assert recipe_notice(TrainConfig(), set()) == ""


# ---------------------------------------------------------------- checkpoints, last line
def test_a_checkpoint_line_gives_its_time_only_past_a_second():
    from lsgd_jax.training.recording import saved_line

    assert saved_line("w/checkpoints", 117, 0.4) == "checkpoint saved: step 117 (w/checkpoints/117)"
    assert saved_line("w/checkpoints", 234, 2.26) == (
        "checkpoint saved: step 234 in at most 2.3 s (w/checkpoints/234)")


def test_the_outputs_line_names_what_the_workdir_holds_and_the_curves_command(tmp_path):
    from lsgd_jax.training.loop import outputs_line

    for name in ("checkpoints", "tensorboard"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "config.json").write_text("{}")
    line = outputs_line(str(tmp_path))
    assert line.startswith(f"outputs in {tmp_path}: metrics.jsonl, config.json, checkpoints/, "
                           "tensorboard/. Curves: lsgd-jax curves " + str(tmp_path))
    assert "orbax.log" not in line  # not made: not named
    (tmp_path / "orbax.log").write_text("x")
    assert "orbax.log" in outputs_line(str(tmp_path))
