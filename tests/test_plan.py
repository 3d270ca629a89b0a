"""The Plan (lsgd_jax.training.plan): every value derived from the config, the mesh and the
data, and every run check, naming its flag."""

import math

import numpy as np
import pytest

from lsgd_jax.rules.schedules import goyal_schedule, warmup_steps
from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.plan import make_plan


def derived(config, num_train_examples, num_devices=8, num_processes=1):
    return make_plan(config, num_train_examples=num_train_examples, num_devices=num_devices,
                     num_processes=num_processes).to_dict()


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


def test_a_paper_length_run_warms_up_over_five_epochs():
    d = derived(TrainConfig(batch_size=8192), 1_281_167)
    assert d["warmup_steps"] == 5 * 156
    assert d["peak_lr"] == pytest.approx(3.2)
    assert math.isclose(d["rate_multiplier"], 32)


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
