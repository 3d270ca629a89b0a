"""The README's Python examples run as written (the second at a CPU-sized scale)."""

import os
import re

import jax
import numpy as np
import optax
import pytest
from helpers import ROOT

import lsgd_jax


def _python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_has_the_four_examples():
    blocks = _python_blocks()
    assert len(blocks) == 4, "update this test with the README's examples"
    assert "goyal_sgd" in blocks[0] and "make_train_step" in blocks[1]
    assert "lsgd_jax.lars(" in blocks[2] and "poly_schedule" in blocks[2]
    assert "load_model" in blocks[3]


def test_the_lars_example_runs_with_the_trust_ratio_on_kernels_only():
    scope: dict = {}
    exec(_python_blocks()[2], scope)  # noqa: S102 - the README's own code
    tx, schedule = scope["tx"], scope["schedule"]
    params = {"conv": {"kernel": np.array([3.0, 4.0], np.float32)},
              "bn": {"scale": np.array([1.0], np.float32)}}
    grads = {"conv": {"kernel": np.array([0.06, 0.08], np.float32)},
             "bn": {"scale": np.array([0.1], np.float32)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    eta = 0.29  # step 0 of the gradual warmup; ‖g‖ = 0.1 < 1: no clipping
    assert float(schedule(0)) == pytest.approx(eta)
    assert float(schedule(5 * 39)) == pytest.approx(0.29 * 128)
    # Kernel: trust = 0.001·5 / (0.1 + 1e-4·5), g' = trust·(g + λw); Nesterov at step 0
    # (u = g'): Δw = −η·(g' + 0.9·u) = −η·1.9·g'. BN γ: the plain rate, no decay.
    trust = 0.001 * 5 / (0.1 + 1e-4 * 5)
    kernel = -eta * 1.9 * trust * (grads["conv"]["kernel"] + 1e-4 * params["conv"]["kernel"])
    # tolerance: a few float32 operations
    np.testing.assert_allclose(np.asarray(updates["conv"]["kernel"]), kernel, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["bn"]["scale"]), [-eta * 1.9 * 0.1], rtol=1e-5)


def test_the_optax_example_runs_and_its_transform_updates():
    scope: dict = {}
    exec(_python_blocks()[0], scope)  # noqa: S102 - the README's own code
    tx = scope["tx"]
    params = {"conv": {"kernel": np.ones((3, 3), np.float32)}}
    state = tx.init(params)
    updates, _ = tx.update({"conv": {"kernel": np.ones((3, 3), np.float32)}}, state, params)
    new = optax.apply_updates(params, updates)
    # Step 0 of the gradual warmup runs at η = 0.1: the kernel moves, by less than η·|g + λw|·2.
    moved = np.abs(np.asarray(new["conv"]["kernel"]) - 1.0)
    assert np.all(moved > 0) and np.all(moved < 0.25)
    assert float(scope["schedule"](0)) == pytest.approx(0.1)


# The engine example at a CPU scale: the same calls, a smaller model and batch.
_SCALED = [("resnet50", "resnet8"), ("num_classes=1000", "num_classes=10"),
           ("224, 224", "32, 32"), ("8192", "64"), ("grad_accum_steps=4", "grad_accum_steps=2"),
           ("bn_group_size=32", "bn_group_size=4"), ('"bfloat16"', '"float32"')]


def test_the_engine_example_runs_one_step_at_a_cpu_scale():
    code = _python_blocks()[1]
    for old, new in _SCALED:
        assert old in code, f"the README's engine example no longer has {old!r}"
        code = code.replace(old, new)
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)),
        jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(0)
    scope = {
        "images_uint8": jax.device_put(rng.integers(0, 256, (64, 32, 32, 3), np.uint8), sharding),
        "labels": jax.device_put(rng.integers(0, 10, (64,), np.int32), sharding),
    }
    exec(code, scope)  # noqa: S102 - the README's own code
    metrics = jax.device_get(scope["metrics"])
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["top1_error"] <= 1
    assert int(jax.device_get(scope["state"].step)) == 1


def _command_lines(readme="README.md", scripts=(("experiments/imagenet_resnet50.py", 0),
                                                ("launch/slurm.sbatch", 0),
                                                ("launch/openmpi.sh", 1))) -> list[list[str]]:
    """The flags of every command of ``scripts`` in a README's shell blocks (``skip``:
    positional arguments before the flags)."""
    import shlex

    with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|>|&", line):
                tokens = shlex.split(part, comments=True)
                for script, skip in scripts:
                    if script in tokens:
                        commands.append(tokens[tokens.index(script) + 1 + skip:])
    return commands


def _train_commands() -> list[list[str]]:
    """The flags of every `lsgd-jax train` line of the README's shell blocks."""
    import shlex

    commands = []
    for line in _bash_lines():
        for part in re.split(r"&&|>|&", line):
            tokens = shlex.split(part, comments=True)
            if tokens[:2] == ["lsgd-jax", "train"]:
                commands.append(tokens[2:])
    return commands


def _bash_lines(readme="README.md") -> list[str]:
    with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


# The quickstart's training command: its flags and what they compute stay as they are.
QUICKSTART = ["--workdir", "runs/fashion_mnist", "--data", "fashion_mnist", "--cpu-devices",
              "8", "--dtype", "float32", "--batch-size", "512", "--epochs", "2",
              "--warmup-epochs", "0.5", "--decay-epochs", "1.5", "--log-every-steps", "20"]


def test_the_quickstart_sets_up_and_trains_then_tests_and_its_bare_train_line_resumes():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    first = [line for line in blocks[0].splitlines() if not line.startswith("#")]
    # Command 1 sets up, then trains; command 2 runs the tests.
    assert len(first) == 2 and "python -m pytest -q" in first[1], first
    setup, _, train = first[0].partition(" && lsgd-jax train ")
    assert "apt-get" in setup and "pip install -e ." in setup and "experiments/" not in setup
    assert train == " ".join(QUICKSTART), train
    # Resuming: the same train command alone on its line, without the set-up.
    then = [line for line in blocks[1].splitlines() if not line.startswith("#")]
    assert "lsgd-jax train " + " ".join(QUICKSTART) in then, then
    assert any(line.endswith("lsgd-jax curves runs/fashion_mnist") for line in then)
    assert "experiments/imagenet_resnet50.py" not in blocks[0] + blocks[1]
    intro = text.split("## What it implements")[0]
    assert "Resuming is the train command alone" in intro
    # The same recipe as ever: every flag given, so no default of the data set applies.
    from lsgd_jax.cli.train import build_parser, config_from_args, given_flags, recipe_notice

    parser = build_parser("lsgd-jax train")
    config = config_from_args(parser.parse_args(QUICKSTART))
    assert (config.model, config.epochs, config.batch_size, config.decay_epochs) == (
        "resnet20", 2, 512, (1.5,))
    assert recipe_notice(config, given_flags(parser, QUICKSTART)) == ""


def test_the_readme_writes_only_into_runs_which_git_ignores_with_model_files():
    import shlex
    import subprocess

    outputs = []
    for line in _bash_lines():
        tokens = shlex.split(line.replace("&&", " "), comments=True)
        for flag in ("--workdir", "--out", "-o"):
            outputs += [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == flag]
        outputs += [t.split("=", 1)[1] for t in tokens if t.startswith("OUT=")]
    assert len(outputs) >= 10, outputs
    local = [o for o in outputs if not o.startswith(("/shared/", "/tmp/"))]
    assert all(o.startswith("runs/") for o in local), local
    check = subprocess.run(["git", "check-ignore", "--no-index", *local, "model.msgpack",
                            "model.json", "elsewhere/model.msgpack"], cwd=ROOT,
                           capture_output=True, text=True)
    ignored = set(check.stdout.split())
    assert ignored == set(local) | {"model.msgpack", "model.json", "elsewhere/model.msgpack"}


def test_the_readme_lists_the_files_a_run_writes():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    listed = text.split("A run writes into `WORKDIR`:")[1].split("\n\n")[0]
    names = re.findall(r"^- `([^`/<]+)", listed, flags=re.M)
    assert sorted(names) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]


def test_every_training_command_in_the_readme_parses_into_a_config():
    from lsgd_jax.cli.train import build_parser, config_from_args

    commands = _command_lines() + _train_commands()
    assert len(commands) >= 7, commands  # demo, fine-tuning, 1 GPU, 8 GPUs, SLURM, MPI, LARS
    parser = build_parser()
    for argv in commands:
        config = config_from_args(parser.parse_args(argv))
        assert config.data in ("fashion_mnist", "imagenet"), argv


def test_every_study_command_in_the_results_readme_parses():
    from lsgd_jax.study.cli import _parser

    commands = _command_lines("experiments/results/README.md",
                              (("experiments/small_scale.py", 0),))
    assert len(commands) >= 5, commands  # run, --list, --report-only, --quick, --mode gpu
    for argv in commands:
        _parser().parse_args(argv)


def _untrained_model_file(tmp_path) -> str:
    """An exported model file of a fresh ResNet-8 (10 classes, 32 pixels)."""
    from lsgd_jax.artifacts.readback import RestoredRun, run_facts
    from lsgd_jax.engine.step import create_train_state
    from lsgd_jax.rules.optim import goyal_sgd
    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.model_file import export_model

    config = TrainConfig(data="synthetic", model="resnet8", image_size=32, num_classes=10,
                         dtype="float32")
    model = lsgd_jax.get_model("resnet8", num_classes=10, dtype="float32", bn_group_size=None)
    mesh = lsgd_jax.make_mesh()
    state = create_train_state(model, goyal_sgd(0.1), rng=jax.random.key(0),
                               input_shape=(1, 32, 32, 3), mesh=mesh)
    run = RestoredRun(workdir=str(tmp_path), config=config,
                      facts=run_facts(config, num_classes=10, channels=3), model=model,
                      state=state, step=0, meta={}, mesh=mesh, steps_per_epoch=None)
    out = str(tmp_path / "model.msgpack")
    export_model(run, out)
    return out


def test_the_model_file_example_runs_as_written(tmp_path):
    """The four lines of the README, with a real model file and two real image files."""
    from PIL import Image

    from lsgd_jax.artifacts.predict import make_predict

    _untrained_model_file(tmp_path)  # model.msgpack, which the README example reads
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(tmp_path / "shirt.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 40), np.uint8)).save(tmp_path / "boot.png")
    code = _python_blocks()[3]
    for name in ("model.msgpack", "shirt.jpg", "boot.png"):
        assert f'"{name}"' in code, f"the README's model example no longer reads {name}"
        code = code.replace(f'"{name}"', repr(str(tmp_path / name)))
    assert len(code.strip().splitlines()) == 4
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own code
    probs = np.asarray(scope["probs"])
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    model, variables, meta = scope["model"], scope["variables"], scope["meta"]
    np.testing.assert_allclose(probs, make_predict(model, variables, meta)(scope["images"]),
                               atol=1e-6)


def test_every_lsgd_jax_command_in_the_readme_parses():
    import shlex

    from lsgd_jax.cli.main import curves_parser, evaluate_parser, export_parser, predict_parser
    from lsgd_jax.cli.train import build_parser

    parsers = {"train": build_parser, "evaluate": evaluate_parser, "export": export_parser,
               "predict": predict_parser, "curves": curves_parser}
    seen = set()
    for line in _bash_lines():
        for part in line.split("&&"):
            tokens = shlex.split(part, comments=True)
            if tokens[:1] == ["lsgd-jax"]:
                parsers[tokens[1]]().parse_args(tokens[2:])
                seen.add(tokens[1])
    assert seen == set(parsers), seen
