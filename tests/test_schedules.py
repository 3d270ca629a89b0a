"""The linear scaling rule, warmup and step decay against hand-written tables."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from lsgd_jax import goyal_schedule, poly_schedule, scaled_learning_rate

SPE = 10  # steps per epoch in the tables: warmup W = 5 epochs = 50 steps
# Decay boundaries at epochs 30, 60, 80 -> steps 300, 600, 800.

# (step, expected rate) written out by hand from the paper's rules, per kn and warmup kind.
TABLES = {
    (256, "gradual"): [(0, 0.1), (25, 0.1), (49, 0.1), (50, 0.1), (299, 0.1),
                       (300, 0.01), (599, 0.01), (600, 0.001), (799, 0.001),
                       (800, 0.0001), (899, 0.0001)],
    (256, "constant"): [(0, 0.1), (25, 0.1), (50, 0.1), (300, 0.01), (600, 0.001),
                        (800, 0.0001)],
    (256, "none"): [(0, 0.1), (25, 0.1), (50, 0.1), (300, 0.01), (600, 0.001),
                    (800, 0.0001)],
    # k = 4, kη = 0.4; gradual increment (0.4 - 0.1) / 50 = 0.006 per step.
    (1024, "gradual"): [(0, 0.1), (1, 0.106), (25, 0.25), (49, 0.394), (50, 0.4),
                        (299, 0.4), (300, 0.04), (599, 0.04), (600, 0.004),
                        (799, 0.004), (800, 0.0004)],
    (1024, "constant"): [(0, 0.1), (25, 0.1), (49, 0.1), (50, 0.4), (299, 0.4),
                         (300, 0.04), (600, 0.004), (800, 0.0004)],
    (1024, "none"): [(0, 0.4), (25, 0.4), (49, 0.4), (50, 0.4), (300, 0.04),
                     (600, 0.004), (800, 0.0004)],
    # k = 32, kη = 3.2; gradual increment (3.2 - 0.1) / 50 = 0.062 per step.
    (8192, "gradual"): [(0, 0.1), (1, 0.162), (25, 1.65), (49, 3.138), (50, 3.2),
                        (299, 3.2), (300, 0.32), (599, 0.32), (600, 0.032),
                        (799, 0.032), (800, 0.0032), (10_000, 0.0032)],
    (8192, "constant"): [(0, 0.1), (25, 0.1), (49, 0.1), (50, 3.2), (300, 0.32),
                         (600, 0.032), (800, 0.0032)],
    (8192, "none"): [(0, 3.2), (49, 3.2), (50, 3.2), (299, 3.2), (300, 0.32),
                     (600, 0.032), (800, 0.0032)],
}


@pytest.mark.parametrize("kn,warmup", sorted(TABLES))
def test_schedule_matches_hand_table(kn, warmup):
    schedule = goyal_schedule(batch_size=kn, steps_per_epoch=SPE, warmup=warmup)
    jitted = jax.jit(schedule)
    for step, expected in TABLES[(kn, warmup)]:
        # tolerance: one float32 rounding of the expected value
        assert float(schedule(step)) == pytest.approx(expected, rel=2e-7, abs=1e-9), step
        # tolerance: 1 ulp, XLA may contract the warmup's multiply-add into an FMA
        np.testing.assert_array_max_ulp(jitted(jnp.int32(step)), schedule(step), maxulp=1)


def test_schedule_jitted_on_a_traced_array_of_steps_equals_eager():
    schedule = goyal_schedule(batch_size=8192, steps_per_epoch=SPE)
    steps = np.arange(0, 900)
    eager = np.array([float(schedule(int(s))) for s in steps])
    traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
    # tolerance: 1 ulp, XLA may contract the warmup's multiply-add into an FMA
    np.testing.assert_array_max_ulp(traced, eager.astype(np.float32), maxulp=1)


def test_gradual_warmup_adds_a_constant_increment_every_iteration():
    schedule = goyal_schedule(batch_size=8192, steps_per_epoch=SPE)
    warm = np.array([float(schedule(s)) for s in range(51)])
    # tolerance: float32 rounding of values up to 3.2
    np.testing.assert_allclose(np.diff(warm), (3.2 - 0.1) / 50, rtol=0, atol=2e-6)


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.1, 8192) == pytest.approx(3.2)
    assert scaled_learning_rate(0.1, 256) == pytest.approx(0.1)
    assert scaled_learning_rate(0.2, 64, reference_batch_size=128) == pytest.approx(0.1)


def test_custom_decay_and_reference():
    schedule = goyal_schedule(batch_size=512, steps_per_epoch=4, base_lr=0.2,
                              reference_batch_size=128, warmup_epochs=1,
                              decay_epochs=(2,), decay_factor=0.5)
    # k = 4, kη = 0.8; W = 4 steps; increment 0.15; decay at step 8 to 0.4.
    for step, expected in [(0, 0.2), (2, 0.5), (4, 0.8), (7, 0.8), (8, 0.4), (100, 0.4)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=2e-7), step


def test_fractional_decay_epochs_decay_at_the_step_they_fall_on():
    # 117 steps per epoch: a decay at epoch 1.5 falls on step 175.5 -> first step 176.
    schedule = goyal_schedule(batch_size=512, steps_per_epoch=117, warmup_epochs=0.5,
                              decay_epochs=(1.5,))
    assert float(schedule(175)) == pytest.approx(0.2, rel=2e-7)
    assert float(schedule(176)) == pytest.approx(0.02, rel=2e-7)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(base_lr=0.0), "base_lr"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(base_lr=math.nan), "base_lr"),
        (dict(base_lr=math.inf), "base_lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-256), "batch_size"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(warmup="linear"), "warmup"),
        (dict(warmup_epochs=-1), "warmup_epochs"),
        (dict(decay_epochs=(60, 30, 80)), "decay_epochs"),
        (dict(decay_factor=0.0), "decay_factor"),
        (dict(reference_batch_size=0), "reference_batch_size"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, name):
    args = dict(batch_size=1024, steps_per_epoch=10) | kwargs
    with pytest.raises(ValueError) as err:
        goyal_schedule(**args)
    assert name in str(err.value)
    assert repr(kwargs[name]) in str(err.value)


def test_scaled_learning_rate_rejects_bad_values():
    with pytest.raises(ValueError, match="base_lr"):
        scaled_learning_rate(-0.1, 256)
    with pytest.raises(ValueError, match="batch_size"):
        scaled_learning_rate(0.1, 0)


@settings(max_examples=40, deadline=None)
@given(
    kn=st.sampled_from([32, 128, 256, 512, 2048, 8192, 65536]),
    spe=st.integers(1, 50),
    base_lr=st.floats(1e-3, 1.0),
    warmup_epochs=st.integers(0, 6),
    warmup=st.sampled_from(["gradual", "constant", "none"]),
    first_decay=st.integers(7, 20),
)
def test_schedule_properties(kn, spe, base_lr, warmup_epochs, warmup, first_decay):
    decays = (first_decay, first_decay + 5, first_decay + 8)
    schedule = goyal_schedule(batch_size=kn, steps_per_epoch=spe, base_lr=base_lr,
                              warmup=warmup, warmup_epochs=warmup_epochs,
                              decay_epochs=decays)
    k = kn / 256
    peak = base_lr * k
    W = warmup_epochs * spe
    steps = np.arange((decays[-1] + 2) * spe)
    lr = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)), np.float64)
    rel = 1e-5  # tolerance: float32 arithmetic

    has_warmup = k > 1 and W > 0 and warmup != "none"
    if has_warmup:
        assert lr[0] == pytest.approx(base_lr, rel=rel)
        assert np.all(lr[:W] <= peak * (1 + rel))
        if warmup == "gradual":
            assert np.all(np.diff(lr[:W + 1]) >= 0)
        else:
            np.testing.assert_allclose(lr[:W], base_lr, rtol=rel)
    else:
        assert lr[0] == pytest.approx(peak, rel=rel)
    # after warmup: kη until the first decay, then non-increasing and piecewise constant
    first = decays[0] * spe
    np.testing.assert_allclose(lr[W:first], peak, rtol=rel)
    assert np.all(np.diff(lr[W:]) <= 0)
    np.testing.assert_allclose(lr[-1], peak * 0.1**3, rtol=rel)
    # a pure function of the step: recomputing at any step gives the same value
    for s in (0, W, first, len(steps) - 1):
        assert float(schedule(int(s))) == pytest.approx(lr[s], rel=rel)


# The polynomial decay by hand: kn = 1024 (k = 4, kη = 0.4), 2 steps per epoch, 4 epochs
# (T = 8), warmup 1 epoch (W = 2), power 2, end rate 0.04:
#   gradual warmup: 0.1, 0.1 + 0.3/2 = 0.25; then 0.04 + 0.36·(1 − (t − 2)/6)²:
#   t = 2: 0.4; 3: 0.04 + 0.36·25/36 = 0.29; 4: 0.04 + 0.36·16/36 = 0.2; 5: 0.13; 6: 0.08;
#   7: 0.05; 8 and after: 0.04.
POLY_TABLES = {
    "gradual": [0.1, 0.25, 0.4, 0.29, 0.2, 0.13, 0.08, 0.05, 0.04, 0.04],
    "constant": [0.1, 0.1, 0.4, 0.29, 0.2, 0.13, 0.08, 0.05, 0.04, 0.04],
    # No warmup: the decay runs over all 8 steps, 0.04 + 0.36·(1 − t/8)².
    "none": [0.4, 0.04 + 0.36 * 49 / 64, 0.04 + 0.36 * 36 / 64, 0.04 + 0.36 * 25 / 64,
             0.04 + 0.36 * 16 / 64, 0.04 + 0.36 * 9 / 64, 0.04 + 0.36 * 4 / 64,
             0.04 + 0.36 / 64, 0.04, 0.04],
}


@pytest.mark.parametrize("warmup", sorted(POLY_TABLES))
def test_poly_schedule_matches_hand_table(warmup):
    schedule = poly_schedule(batch_size=1024, steps_per_epoch=2, epochs=4, warmup_epochs=1,
                             warmup=warmup, power=2, end_lr=0.04)
    jitted = jax.jit(schedule)
    for step, expected in enumerate(POLY_TABLES[warmup]):
        # tolerance: a few float32 roundings of numbers of order 0.1
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step
        assert float(jitted(jnp.int32(step))) == pytest.approx(expected, rel=1e-6), step


def test_poly_schedule_power_one_is_a_straight_line_and_k1_has_no_warmup():
    # k = 1 (kn = 256): no warmup, from η = 0.1 straight down to 0 over 10 steps.
    schedule = poly_schedule(batch_size=256, steps_per_epoch=5, epochs=2, power=1, end_lr=0.0)
    assert [round(float(schedule(t)), 6) for t in range(0, 11, 2)] == [
        0.1, 0.08, 0.06, 0.04, 0.02, 0.0]


@pytest.mark.parametrize("kwargs, name", [
    (dict(end_lr=0.5), "end_lr"),            # above the peak rate 0.4
    (dict(end_lr=-1e-4), "end_lr"),
    (dict(power=0), "power"),
    (dict(epochs=0), "epochs"),
    (dict(epochs=1), "epochs"),              # no longer than the warmup
    (dict(warmup="linear"), "warmup"),
])
def test_poly_schedule_bad_arguments_name_the_argument_and_value(kwargs, name):
    args = dict(batch_size=1024, steps_per_epoch=2, epochs=4, warmup_epochs=1) | kwargs
    with pytest.raises(ValueError) as err:
        poly_schedule(**args)
    value = kwargs[name]
    assert name in str(err.value)
    assert repr(value) in str(err.value) or f"({value:g})" in str(err.value)
