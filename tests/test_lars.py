"""LARS (lsgd_jax.rules.lars): hand-computed steps, the mask, and optax.lars where the two agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPT_STEPS as STEPS
from helpers import max_rel_diff, opt_schedule
from helpers import opt_grads as _random_grads
from helpers import opt_params as _params

from lsgd_jax import default_weight_decay_mask, goyal_sgd, lars, scale_by_lars

# The schedule, parameters and gradients of the SGD tests, so the two compare alike.
SCHEDULE = opt_schedule()


def _parallel_grads(step, params):
    """g = c·w with c > 0 per leaf: then ‖g + λw‖ = ‖g‖ + λ‖w‖ and the two LARS agree."""
    leaves, treedef = jax.tree.flatten(params)
    cs = jax.random.uniform(jax.random.fold_in(jax.random.key(3), step), (len(leaves),),
                            minval=0.5, maxval=2.0)
    return treedef.unflatten([c * w for c, w in zip(cs, leaves)])


def _run(tx, params, grads=_random_grads, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for t in range(steps):
        updates, state = update(grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


# By hand: kernel w = (3, 4), g = (0.8, −0.6) (orthogonal to w, so ‖g‖ + λ‖w‖ = 2 and
# ‖g + λw‖ = 1.41 differ); λ = 0.2, η_tc = 0.1, η = 20, m = 0.9, eq. (9):
# step 1: trust = 0.1·5 / (1 + 0.2·5) = 0.25; g' = 0.25·(0.8 + 0.6, −0.6 + 0.8) = (0.35, 0.05)
#         u = (0.35, 0.05); w = (3, 4) − 20·u = (−4, 3)
# step 2: ‖w‖ = 5, trust = 0.25; g' = 0.25·(0.8 − 0.8, −0.6 + 0.6) = (0, 0)
#         u = 0.9·(0.35, 0.05) = (0.315, 0.045); w = (−4, 3) − 20·u = (−10.3, 2.1)
# BN scale (1, 1), g = (0.1, −0.2), and bias 0.5, g = 0.3: no decay, no trust ratio:
#   scale: u = (0.1, −0.2) → w = (−1, 5); u = (0.19, −0.38) → w = (−4.8, 12.6)
#   bias:  u = 0.3 → w = −5.5; u = 0.57 → w = −16.9
HAND = [
    {"conv": {"kernel": [-4.0, 3.0]}, "bn": {"scale": [-1.0, 5.0]}, "dense": {"bias": [-5.5]}},
    {"conv": {"kernel": [-10.3, 2.1]}, "bn": {"scale": [-4.8, 12.6]}, "dense": {"bias": [-16.9]}},
]


def _hand_params():
    return {"conv": {"kernel": jnp.array([3.0, 4.0])}, "bn": {"scale": jnp.array([1.0, 1.0])},
            "dense": {"bias": jnp.array([0.5])}}


def _hand_grads(step, params):
    return {"conv": {"kernel": jnp.array([0.8, -0.6])}, "bn": {"scale": jnp.array([0.1, -0.2])},
            "dense": {"bias": jnp.array([0.3])}}


@pytest.mark.parametrize("form", ["eq9", "eq10"])
def test_two_steps_by_hand(form):
    tx = lars(20.0, momentum=0.9, nesterov=False, weight_decay=0.2, trust_coefficient=0.1,
              form=form)
    history = _run(tx, _hand_params(), _hand_grads, steps=2)
    for got, want in zip(history, HAND):
        want = jax.tree.map(np.asarray, want, is_leaf=lambda x: isinstance(x, list))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            # tolerance: a few float32 operations on numbers of order 1-10
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-5,
                                       err_msg=jax.tree_util.keystr(path))


def test_the_default_trust_coefficient_is_0_001():
    # w = (3, 4), g = (0.6, 0.8), λ = 0: trust = 0.001·5 / 1 = 0.005, Δw = −1·0.005·g.
    tx = lars(1.0, momentum=0.9, nesterov=False, weight_decay=0.0)
    params = {"kernel": jnp.array([3.0, 4.0])}
    updates, _ = tx.update({"kernel": jnp.array([0.6, 0.8])}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), [-0.003, -0.004], rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay, grads", [(0.0, _random_grads), (0.05, _parallel_grads)],
                         ids=["no-decay", "decay-parallel-grads"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_equals_optax_lars_where_the_definitions_agree(nesterov, weight_decay, grads, eps):
    """Same masks, the same ε, eq. (10) without the correction; λ = 0, or g parallel to w
    (where ‖g‖ + λ‖w‖ = ‖g + λw‖). Through warmup and three decays."""
    params = _params(jax.random.key(0))
    ours = _run(lars(SCHEDULE, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                     trust_coefficient=0.01, eps=eps, form="eq10", momentum_correction=False),
                params, grads)
    ref = _run(optax.lars(SCHEDULE, weight_decay=weight_decay,
                          weight_decay_mask=default_weight_decay_mask, trust_coefficient=0.01,
                          eps=eps, trust_ratio_mask=default_weight_decay_mask, momentum=0.9,
                          nesterov=nesterov), params, grads)
    for t, (a, b) in enumerate(zip(ours, ref)):
        # tolerance: the same float32 operations, partly reassociated, over 34 steps
        assert max_rel_diff(a, b) < 2e-5, t


def test_differs_from_optax_lars_defaults_on_bn_and_biases():
    """optax.lars's defaults decay and trust-scale every leaf; this LARS leaves BN and biases."""
    params = _params(jax.random.key(1))
    ours = _run(lars(SCHEDULE, weight_decay=1e-4), params, steps=3)[-1]
    ref = _run(optax.lars(SCHEDULE, weight_decay=1e-4, nesterov=True), params, steps=3)[-1]
    assert max_rel_diff(ours["bn"], ref["bn"]) > 1e-2


def test_masked_leaves_get_the_plain_rate():
    """BN γ/β and biases move exactly as under goyal_sgd at the same rate; kernels do not."""
    params = _params(jax.random.key(2))
    ours = _run(lars(SCHEDULE, weight_decay=1e-4), params)
    sgd = _run(goyal_sgd(SCHEDULE, weight_decay=1e-4), params)
    for t, (a, b) in enumerate(zip(ours, sgd)):
        # tolerance: the same operations in the same order
        assert max_rel_diff(a["bn"], b["bn"]) < 1e-6, t
        assert max_rel_diff(a["dense"]["bias"], b["dense"]["bias"]) < 1e-6, t
        assert max_rel_diff(a["conv"]["kernel"], b["conv"]["kernel"]) > 1e-3, t
    # With every leaf masked out, LARS is goyal_sgd (no decay, no trust ratio anywhere).
    none = lambda p: jax.tree.map(lambda _: False, p)  # noqa: E731
    a = _run(lars(SCHEDULE, weight_decay_mask=none), params, steps=5)[-1]
    b = _run(goyal_sgd(SCHEDULE, weight_decay_mask=none), params, steps=5)[-1]
    assert max_rel_diff(a, b) < 1e-6


def test_a_zero_tensor_moves_at_the_plain_rate():
    # ‖w‖ = 0 would make the trust ratio 0 and freeze the tensor: it is 1 there.
    params = {"kernel": jnp.zeros((2, 2))}
    g = {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]])}
    tx = scale_by_lars(weight_decay=1e-4)
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["kernel"]), np.asarray(g["kernel"]))


def test_chains_with_the_schedule_and_the_momentum_correction():
    """eq. (10) with the correction equals eq. (9) through warmup and decays, as for SGD."""
    params = _params(jax.random.key(4))
    eq9 = _run(lars(SCHEDULE, form="eq9"), params)
    eq10 = _run(lars(SCHEDULE, form="eq10"), params)
    for t, (a, b) in enumerate(zip(eq10, eq9)):
        # tolerance: float32 reassociation (η·u vs v) over 34 steps
        assert max_rel_diff(a, b) < 2e-5, t


def test_needs_the_parameters():
    tx = lars(0.1)
    params = {"kernel": jnp.ones((2,))}
    with pytest.raises(ValueError, match="parameters"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("kwargs, name", [
    (dict(trust_coefficient=0.0), "trust_coefficient"),
    (dict(trust_coefficient=float("nan")), "trust_coefficient"),
    (dict(trust_coefficient=True), "trust_coefficient"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(momentum=1.0), "momentum"),
    (dict(form="eq11"), "form"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, name):
    with pytest.raises(ValueError) as err:
        lars(0.1, **kwargs)
    assert name in str(err.value) and repr(kwargs[name]) in str(err.value)


def test_docstrings_state_the_trust_ratio():
    for fn in (lars, scale_by_lars):
        assert "η_tc·‖w‖ / (‖g‖ + λ‖w‖ + ε) · (g + λw)" in fn.__doc__


def test_second_update_does_not_recompile_and_bfloat16_keeps_its_dtype():
    from helpers import compilations

    params = _params(jax.random.key(5))
    tx = lars(SCHEDULE)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(2):
        _, state = update(_random_grads(t, params), state, params)
    assert compilations(update) == 1
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    updates, _ = tx.update(_random_grads(0, low), tx.init(low), low)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
