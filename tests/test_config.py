"""TrainConfig: the paper's defaults, every field one flag, the recipe flags and the start-up config."""


import numpy as np
import pytest

from lsgd_jax.training.config import TrainConfig, evaluation_steps
from lsgd_jax.training.metrics import MetricsWriter, eval_history
from lsgd_jax.training.plan import make_plan


def test_defaults_are_the_papers_recipe():
    """Section 5.1: kn 256, n 32, 90 epochs, η 0.1 per 256, 5 gradual warmup epochs,
    ×0.1 at 30/60/80, Nesterov 0.9, λ 1e-4 (eq. 9), zero-γ, ResNet-50."""
    c = TrainConfig()
    assert (c.batch_size, c.bn_group_size, c.grad_accum_steps) == (256, 32, 1)
    assert (c.epochs, c.base_lr, c.reference_batch_size) == (90, 0.1, 256)
    assert (c.warmup, c.warmup_epochs) == ("gradual", 5)
    assert (c.decay_epochs, c.decay_factor) == ((30, 60, 80), 0.1)
    assert (c.momentum, c.nesterov, c.momentum_form) == (0.9, True, "eq9")
    assert c.weight_decay == 1e-4
    assert c.zero_init_residual is True
    assert c.model == "resnet50" and c.median_evals == 5 and c.eval_every_epochs == 1
    d = make_plan(c, num_train_examples=1_281_167, num_devices=8).to_dict()
    assert d["steps_per_epoch"] == 5004 and d["total_steps"] == 90 * 5004
    assert d["peak_lr"] == pytest.approx(0.1) and d["warmup_steps"] == 0  # k = 1
    assert d["decay_steps"] == [30 * 5004, 60 * 5004, 80 * 5004]
    assert d["num_bn_workers"] == 8


def test_evaluation_steps_end_with_the_medians_points():
    # 90 epochs: the median's five points are the last five epoch ends.
    steps = evaluation_steps(total_steps=90 * 10, steps_per_epoch=10, eval_every_epochs=1,
                             median_evals=5)
    assert steps == [10 * e for e in range(1, 91)]
    # 2 epochs of 117 steps: one point per 90th of the run (2.6 steps), ending at the last.
    steps = evaluation_steps(total_steps=234, steps_per_epoch=117, eval_every_epochs=1,
                             median_evals=5)
    assert steps == [117, 224, 226, 229, 231, 234]
    # A run shorter than 90 steps still gets 5 distinct points.
    steps = evaluation_steps(total_steps=12, steps_per_epoch=4, eval_every_epochs=2,
                             median_evals=5)
    assert steps == [8, 9, 10, 11, 12]
    # Fractional epochs: 2.5 epochs of 10 steps evaluates at epochs 1, 2 and the end.
    steps = evaluation_steps(total_steps=25, steps_per_epoch=10, eval_every_epochs=1,
                             median_evals=1)
    assert steps == [10, 20, 25]


def test_eval_history_keeps_every_evaluation_of_a_fractional_epoch(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step, epoch, err in [(10, 1.0, 0.5), (20, 2.0, 0.4), (25, 2.5, 0.3)]:
        writer.write("eval", step, epoch=epoch, top1_error=err)
    writer.write("eval", 25, epoch=2.5, top1_error=0.2)  # evaluated again after a resume
    history = eval_history(str(tmp_path))
    assert list(history) == [10, 20, 25]
    assert [r["top1_error"] for r in history.values()] == [0.5, 0.4, 0.2]


@pytest.mark.parametrize("changes, text", [
    (dict(median_evals=0), r"--median-evals must be an integer in \[1, 90\], got 0"),
    (dict(eval_every_epochs=0), r"--eval-every-epochs must be an integer in \[1, 100000\], got 0"),
])
def test_evaluation_settings_are_checked(changes, text):
    with pytest.raises(ValueError, match=text):
        TrainConfig(**changes)


def test_counts_read_in_the_right_number():
    from lsgd_jax.training.metrics import plural

    assert [plural(1, "process"), plural(2, "process"), plural(1, "microbatch"),
            plural(4, "microbatch"), plural(0, "warmup step"), plural(1, "device")] == [
        "1 process", "2 processes", "1 microbatch", "4 microbatches", "0 warmup steps",
        "1 device"]


def test_every_config_field_is_one_flag_and_round_trips():
    import dataclasses

    from lsgd_jax.cli.train import build_parser, config_flag, config_from_args

    fields = dataclasses.fields(TrainConfig)
    parser = build_parser()
    flags = [config_flag(f) for f in fields]
    assert len(set(flags)) == len(fields)
    assert all(f.metadata["help"] for f in fields)
    assert config_from_args(parser.parse_args(["--workdir", "w"])) == TrainConfig()
    changed = TrainConfig(data="fashion_mnist", model="resnet8", batch_size=64,
                          bn_group_size=16, decay_epochs=(1.5, 3), zero_init_residual=False,
                          eval_batch_size=32, momentum_form="eq10", allreduce="ring",
                          dtype="float32", decode_threads=2, num_steps=7, seed=3)
    argv = ["--workdir", "w"]
    for f in fields:
        value = getattr(changed, f.name)
        if value is not None:
            argv += [config_flag(f),
                     ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert config_from_args(parser.parse_args(argv)) == changed


def test_help_gives_real_defaults_and_no_empty_ones():
    import re

    from lsgd_jax.cli.train import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert re.search(r"--momentum MOMENTUM .*?\(default: 0\.9\)", text)
    assert re.search(r"--seed SEED .*?\(default: 0\)", text)  # a 0 is a real default


@pytest.mark.parametrize("changes, text", [
    (dict(optimizer="adam"), r"optimizer must be one of \('sgd', 'lars'\), got 'adam'"),
    (dict(schedule="cosine"), r"schedule must be one of \('steps', 'poly'\), got 'cosine'"),
    (dict(trust_coefficient=0.0), r"--trust-coefficient must be a number in \(0, 1000\], got 0.0"),
    (dict(poly_power=-2.0), r"--poly-power must be a number in \(0, 1000\], got -2.0"),
    (dict(label_smoothing=1.0), r"--label-smoothing must be a number in \[0, 1\), got 1.0"),
    (dict(end_lr=-1.0), r"--end-lr must be a number in \[0, 1000\], got -1.0"),
    (dict(schedule="poly", batch_size=512, end_lr=0.5), r"end_lr must be in \[0, 0.2\]"),
    (dict(schedule="poly", batch_size=512, epochs=5), r"warmup_epochs \(5\) must be shorter "
                                                      r"than epochs \(5\)"),
])
def test_recipe_flags_are_checked(changes, text):
    with pytest.raises(ValueError, match=text):
        TrainConfig(**changes)


def test_the_default_recipe_is_the_papers_and_the_plan_names_the_recipe():
    from lsgd_jax.training.recipe import build

    c = TrainConfig()
    assert (c.optimizer, c.schedule, c.label_smoothing) == ("sgd", "steps", 0.0)
    assert c.end_lr == 1e-4 and c.poly_power == 2 and c.trust_coefficient == 0.001
    # A small base rate is fine with the (unused) default end rate of the poly schedule.
    assert TrainConfig(base_lr=1e-5).schedule == "steps"
    plan = make_plan(c, num_train_examples=1_281_167, num_devices=8)
    assert plan.describe("gradual").endswith(
        "; recipe: Nesterov momentum SGD, eq9, gradual warmup, step decay ×0.1 at epochs 30, "
        "60, 80")
    lars = c.replace(optimizer="lars", schedule="poly", label_smoothing=0.1, batch_size=8192,
                     end_lr=1e-3)
    plan = make_plan(lars, num_train_examples=1_281_167, num_devices=8)
    assert plan.to_dict()["recipe"] == (
        "recipe: LARS (trust coefficient 0.001) + Nesterov momentum SGD, eq9, gradual warmup, "
        "poly decay (power 2, end rate 0.001), label smoothing 0.1")
    assert plan.decay_steps == ()  # no step decays under --schedule poly
    schedule, tx = build(lars, plan)
    assert float(schedule(780)) == pytest.approx(3.2)  # the peak after 5 warmup epochs
    assert float(schedule(plan.total_steps)) == pytest.approx(1e-3)
    # LARS: a kernel w = (3, 4) with g = (0.6, 0.8) moves by η·0.001·5/(1 + λ·5)·(g + λw).
    params = {"kernel": np.array([3.0, 4.0], np.float32)}
    updates, _ = tx.update({"kernel": np.array([0.6, 0.8], np.float32)}, tx.init(params), params)
    trust = 0.001 * 5 / (1 + 1e-4 * 5)
    expected = -0.1 * trust * (np.array([0.6, 0.8]) + 1e-4 * np.array([3.0, 4.0])) * 1.9  # Nesterov
    np.testing.assert_allclose(np.asarray(updates["kernel"]), expected, rtol=1e-5)


def test_the_start_up_config_shows_only_what_matters_to_the_run():
    fashion = TrainConfig(data="fashion_mnist", dtype="float32", batch_size=512, epochs=2,
                          warmup_epochs=0.5, decay_epochs=(1.5,), log_every_steps=20)
    lines = fashion.summary()
    assert 5 <= len(lines) <= 8 and all(len(line) < 200 for line in lines), lines
    text = "\n".join(lines)
    for absent in ("imagenet2012", "--synthetic-examples", "--trust-coefficient",
                   "--tfds-name", "--decode-workers", "--poly-power", "--end-lr",
                   "--momentum-correction", "--bn-impl", "--color-jitter", "--relist"):
        assert absent not in text, absent
    for present in ("data: --data fashion_mnist", "--model resnet20", "--batch-size 512",
                    "--decay-epochs 1.5", "--epochs 2 ", "--warmup-epochs 0.5",
                    "--nesterov true", "--weight-decay 0.0001"):
        assert present in text, present
    lars = TrainConfig(data="imagenet", optimizer="lars", schedule="poly", momentum_form="eq10",
                       decay_epochs=(30, 60, 80))
    text = "\n".join(lars.summary())
    for present in ("--tfds-name imagenet2012", "--trust-coefficient 0.001", "--poly-power 2",
                    "--end-lr 0.0001", "--momentum-correction true", "--resizer auto"):
        assert present in text, present
    assert "--decay-epochs" not in text and "--synthetic-examples" not in text
    assert "--synthetic-examples 1281167" in "\n".join(TrainConfig().summary())
    assert "--decay-epochs 30,60,80" in "\n".join(TrainConfig().summary())
    folder = TrainConfig(data="folder", data_dir="/data/x", model="resnet50")
    assert "--relist false" in "\n".join(folder.summary())
