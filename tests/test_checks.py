"""lsgd_jax.base.checks: the one integer and number check of every layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgd_jax.base import checks


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "1", None, 0, -3])
def test_an_integer_is_never_a_bool_a_float_or_a_string(value):
    with pytest.raises(ValueError, match=rf"n must be a positive integer, got {value!r}"):
        checks.integer("n", value)


def test_integers_of_numpy_pass_and_ranges_are_named():
    assert checks.integer("n", np.int64(4)) == 4 and type(checks.integer("n", np.int32(4))) is int
    assert checks.integer("seed", 0, low=0) == 0
    with pytest.raises(ValueError, match=r"process_id must be an integer in \[0, 2\), got 2"):
        checks.integer("process_id", 2, low=0, high=2)
    with pytest.raises(KeyError, match="step must be an integer >= 0"):
        checks.integer("step", -1, low=0, error=KeyError)


@pytest.mark.parametrize("value", [True, "0.5", float("nan"), float("inf"), 1.0, -0.1])
def test_a_number_is_finite_in_its_range_and_never_a_bool(value):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got"):
        checks.real("momentum", value, low=0, high=1, open_high=True)


def test_numbers_of_numpy_and_known_arrays_pass_and_traced_ones_wait():
    assert checks.real("m", np.float32(0.5), low=0) == 0.5
    assert checks.real("m", jnp.asarray(0.25), low=0) == 0.25
    with pytest.raises(ValueError, match="a positive finite number"):
        checks.real("eta", jnp.asarray(0.0), low=0, open_low=True)

    seen = []

    @jax.jit
    def f(x):
        seen.append(checks.real("m", x, low=0, traced_ok=True))
        return x

    f(1.0)
    assert seen == [None]  # known only when the program runs
    with pytest.raises(ValueError, match="m must be a finite number >= 0"):
        jax.jit(lambda x: checks.real("m", x, low=0))(1.0)
