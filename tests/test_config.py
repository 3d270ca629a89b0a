"""TrainConfig: the paper's defaults; the Plan: the values derived from it, the mesh and the data."""

import math

import numpy as np
import pytest

from lsgd_jax.rules.schedules import goyal_schedule, warmup_steps
from lsgd_jax.training.config import TrainConfig, evaluation_steps
from lsgd_jax.training.metrics import MetricsWriter, eval_history
from lsgd_jax.training.plan import make_plan


def derived(config, num_train_examples, num_devices=8, num_processes=1):
    return make_plan(config, num_train_examples=num_train_examples, num_devices=num_devices,
                     num_processes=num_processes).to_dict()


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
    d = derived(c, 1_281_167)
    assert d["steps_per_epoch"] == 5004 and d["total_steps"] == 90 * 5004
    assert d["peak_lr"] == pytest.approx(0.1) and d["warmup_steps"] == 0  # k = 1
    assert d["decay_steps"] == [30 * 5004, 60 * 5004, 80 * 5004]
    assert d["num_bn_workers"] == 8


@pytest.mark.parametrize("kn, spe, warmup_epochs, expected", [
    (1024, 3, 5 / 6, 3),     # W = 2.5 steps: the schedule is below the peak at steps 0, 1, 2
    (8192, 156, 5, 780),     # the paper's 8k: exactly 5 epochs
    (512, 117, 0.5, 59),     # W = 58.5
    (256, 5004, 5, 0),       # k = 1: nothing to warm up
])
def test_reported_warmup_steps_are_the_schedules(kn, spe, warmup_epochs, expected):
    ref = 64 if kn == 1024 else 256
    config = TrainConfig(batch_size=kn, reference_batch_size=ref, warmup_epochs=warmup_epochs,
                         bn_group_size=32 if kn % 32 == 0 else 16)
    reported = derived(config, spe * kn)["warmup_steps"]
    assert reported == expected
    lr = goyal_schedule(batch_size=kn, steps_per_epoch=spe, base_lr=0.1,
                        reference_batch_size=ref, warmup_epochs=warmup_epochs)
    peak = 0.1 * kn / ref
    rates = np.asarray([float(lr(t)) for t in range(expected + 2)])
    # Every reported warmup step is below the peak; the first step after is the peak.
    assert np.all(rates[:expected] < peak * (1 - 1e-6))
    assert rates[expected] == pytest.approx(peak, rel=1e-6)
    assert warmup_steps(batch_size=kn, steps_per_epoch=spe, reference_batch_size=ref,
                        warmup_epochs=warmup_epochs) == expected


def test_examples_left_out_per_epoch():
    d = derived(TrainConfig(batch_size=8192), 1_281_167)
    assert d["examples_left_out_per_epoch"] == 1_281_167 - 156 * 8192 == 3215
    d = derived(TrainConfig(batch_size=65536), 1_281_167)
    assert d["examples_left_out_per_epoch"] == 35_983


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


def test_a_paper_length_run_warms_up_over_five_epochs():
    d = derived(TrainConfig(batch_size=8192), 1_281_167)
    assert d["warmup_steps"] == 5 * 156
    assert d["peak_lr"] == pytest.approx(3.2)
    assert math.isclose(d["rate_multiplier"], 32)


def test_counts_read_in_the_right_number():
    from lsgd_jax.training.metrics import plural

    assert [plural(1, "process"), plural(2, "process"), plural(1, "microbatch"),
            plural(4, "microbatch"), plural(0, "warmup step"), plural(1, "device")] == [
        "1 process", "2 processes", "1 microbatch", "4 microbatches", "0 warmup steps",
        "1 device"]


def test_the_plan_of_the_papers_8k_run_by_hand():
    """kn = 8192 on 256 GPUs (32 per host, 8 hosts), n = 32, the paper's 8k."""
    plan = make_plan(TrainConfig(batch_size=8192), num_train_examples=1_281_167,
                     num_devices=256, num_processes=8)
    assert (plan.num_bn_workers, plan.per_device_batch, plan.per_process_batch) == (256, 32, 1024)
    assert (plan.microbatch, plan.steps_per_epoch, plan.total_steps) == (32, 156, 14_040)
    assert plan.decay_steps == (4680, 9360, 12_480) and plan.warmup_steps == 780
    assert plan.eval_steps[-5:] == (13_416, 13_572, 13_728, 13_884, 14_040)
    assert plan.layout.num_bn_workers == 256 and plan.eval_batch_size == 8192
    assert "kn=8192 (k=256 BN workers of n=32) on 256 devices in 8 processes" in \
        plan.describe("gradual")


@pytest.mark.parametrize("changes, devices, processes, text", [
    (dict(batch_size=100), 8, 1, r"--batch-size 100 does not split over 8 devices × "
                                 r"--grad-accum-steps 1; use a multiple of 256"),
    (dict(batch_size=64, grad_accum_steps=4), 8, 1,
     r"--bn-group-size 32 is larger than the microbatch of 2 images per device"),
    (dict(batch_size=96, bn_group_size=8), 8, 1,
     r"--bn-group-size 8 does not divide the microbatch of 12 images per device"),
    (dict(batch_size=96, bn_group_size=4), 8, 5, r"--batch-size 96 does not split over the 5 "
                                                 r"processes"),
    (dict(batch_size=64, bn_group_size=8, eval_batch_size=12), 8, 1,
     r"--eval-batch-size 12 must be divisible by the 8 devices"),
    (dict(batch_size=2048, bn_group_size=8), 8, 1, r"--batch-size 2048 is larger than the "
                                                   r"training set \(1000 examples\)"),
])
def test_the_plan_names_the_flag_to_change(changes, devices, processes, text):
    with pytest.raises(ValueError, match=text):
        make_plan(TrainConfig(**changes), num_train_examples=1000, num_devices=devices,
                  num_processes=processes)


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


def test_a_decay_at_or_past_the_end_is_a_warning_and_left_out_of_the_start_line():
    from lsgd_jax.training.plan import plan_warnings

    # 117 steps per epoch; 2 epochs = 234 steps. A decay at step 234 would apply from the
    # 235th step on, which the run does not have.
    base = TrainConfig(data="fashion_mnist", batch_size=512, epochs=2, warmup_epochs=0.5)
    for decays, kept, late in (((1.5,), "step decay ×0.1 at epoch 1.5", ""),
                               ((1.5, 2), "step decay ×0.1 at epoch 1.5", "the decay at epoch 2 "
                                "(step 234, --decay-epochs) is at or past the end"),
                               ((2, 3), "no decay", "the decays at epochs 2, 3 (steps 234, 351, "
                                "--decay-epochs) are at or past the end")):
        config = base.replace(decay_epochs=decays)
        plan = make_plan(config, num_train_examples=60_000, num_devices=8)
        assert plan.recipe.endswith(kept), plan.recipe
        lines = plan_warnings(config, plan)
        assert [line for line in lines if late and late in line] == lines[:1] if late else (
            lines == []), lines
        if late:
            assert lines[0].startswith("warning: ") and "never decays" in lines[0]
    # The last step that still decays: 233 (epoch 233/117), inside the run.
    config = base.replace(decay_epochs=(233 / 117,))
    plan = make_plan(config, num_train_examples=60_000, num_devices=8)
    assert plan.decay_steps == (233,) and plan_warnings(config, plan) == []
    # --num-steps ends the run sooner: a decay after it is named with the flag.
    config = base.replace(decay_epochs=(1.5,), num_steps=100)
    plan = make_plan(config, num_train_examples=60_000, num_devices=8)
    assert plan.recipe.endswith("no decay")
    assert "(100 steps, --epochs 2, --num-steps 100)" in plan_warnings(config, plan)[0]


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
