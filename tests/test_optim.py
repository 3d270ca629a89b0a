"""Momentum forms (eqs. 9 and 10), momentum correction, masked L2, Optax interplay."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPT_STEPS, compilations, max_rel_diff, opt_grads, opt_params, opt_schedule
from hypothesis import given, settings

from lsgd_jax import (
    MomentumState,
    default_weight_decay_mask,
    goyal_schedule,
    goyal_sgd,
    momentum_sgd,
)

# Warmup for 5 epochs of 2 steps, then decays at epochs 8, 12, 14: steps 16, 24, 28.
SCHEDULE, STEPS, _params, _grads = opt_schedule(), OPT_STEPS, opt_params, opt_grads


def _run(tx, params, steps=STEPS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for t in range(steps):
        updates, state = update(_grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


@pytest.mark.parametrize("nesterov", [False, True])
def test_eq9_equals_optax_sgd(nesterov):
    params = _params(jax.random.key(0))
    ours = _run(momentum_sgd(SCHEDULE, 0.9, nesterov=nesterov, form="eq9"), params)
    ref = _run(optax.sgd(SCHEDULE, momentum=0.9, nesterov=nesterov), params)
    for t, (a, b) in enumerate(zip(ours, ref)):
        # tolerance: the same float32 operations in the same order -> 1e-6 relative
        assert max_rel_diff(a, b) < 1e-6, t


@pytest.mark.parametrize("nesterov", [False, True])
def test_eq10_with_correction_equals_eq9_through_warmup_and_decays(nesterov):
    params = _params(jax.random.key(1))
    eq9 = _run(momentum_sgd(SCHEDULE, 0.9, nesterov=nesterov, form="eq9"), params)
    eq10 = _run(momentum_sgd(SCHEDULE, 0.9, nesterov=nesterov, form="eq10"), params)
    # The schedule really does change: warmup, then three decays.
    rates = {round(float(SCHEDULE(t)), 6) for t in range(STEPS)}
    assert len(rates) > 10
    for t, (a, b) in enumerate(zip(eq10, eq9)):
        # tolerance: float32 reassociation (η·u vs v) over 34 steps
        assert max_rel_diff(a, b) < 2e-5, t


@pytest.mark.parametrize("nesterov", [False, True])
def test_eq10_without_correction_differs_after_a_rate_jump(nesterov):
    # Constant warmup: 0.1 for 10 steps, then a jump to 3.2 (the failure of Remark 2).
    schedule = goyal_schedule(batch_size=8192, steps_per_epoch=2, warmup="constant")
    params = _params(jax.random.key(2))
    kw = dict(momentum=0.9, nesterov=nesterov, form="eq10")
    fixed = _run(momentum_sgd(schedule, momentum_correction=True, **kw), params, 14)
    broken = _run(momentum_sgd(schedule, momentum_correction=False, **kw), params, 14)
    eq9 = _run(momentum_sgd(schedule, 0.9, nesterov=nesterov), params, 14)
    # Before the jump the rate is constant and the correction is a no-op.
    assert max_rel_diff(broken[9], fixed[9]) < 1e-6  # tolerance: float32 rounding
    # After it the uncorrected buffer carries the old, 32x smaller rate.
    assert max_rel_diff(broken[11], eq9[11]) > 1e-2
    assert max_rel_diff(fixed[11], eq9[11]) < 2e-5  # tolerance: float32 reassociation


def test_detectron_threshold_corrects_decays_but_not_gradual_warmup_steps():
    lr = lambda count: jnp.asarray([0.1, 0.105, 0.105, 0.0105])[count]  # noqa: E731
    g = [jnp.array([1.0]), jnp.array([2.0]), jnp.array([-1.0]), jnp.array([0.5])]
    m = 0.9
    tx = momentum_sgd(lr, m, form="eq10", correction_threshold=1.1)
    state = tx.init(jnp.zeros(1))
    updates = []
    for gt in g:
        u, state = tx.update(gt, state)
        updates.append(float(u[0]))
    v1 = 0.1 * 1.0
    v2 = m * v1 + 0.105 * 2.0              # ratio 1.05 <= 1.1: not corrected
    v3 = m * v2 + 0.105 * -1.0
    v4 = m * 0.1 * v3 + 0.0105 * 0.5       # ratio 10 > 1.1: corrected
    # tolerance: float32 rounding
    np.testing.assert_allclose(updates, [-v1, -v2, -v3, -v4], rtol=1e-6)
    with pytest.raises(ValueError, match="correction_threshold"):
        momentum_sgd(0.1, form="eq10", correction_threshold=0.5)


def test_update_equations_by_hand():
    g1, g2 = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    params = jnp.zeros(2)
    lr = lambda count: jnp.where(count == 0, 0.1, 0.4)  # noqa: E731
    m = 0.9
    for form, correction in [("eq9", True), ("eq10", True), ("eq10", False)]:
        tx = momentum_sgd(lr, m, form=form, momentum_correction=correction)
        state = tx.init(params)
        u1, state = tx.update(g1, state)
        u2, state = tx.update(g2, state)
        # step 1: both forms give -0.1·g1
        np.testing.assert_allclose(u1, -0.1 * g1, rtol=1e-6)
        if form == "eq9" or correction:
            expected = -0.4 * (m * g1 + g2)  # eq. (9): −η₂·(m·u₁ + g₂)
        else:
            expected = -(m * 0.1 * g1 + 0.4 * g2)  # eq. (10) uncorrected: −(m·v₁ + η₂·g₂)
        np.testing.assert_allclose(u2, expected, rtol=1e-6)  # tolerance: float32 rounding
        assert isinstance(state, MomentumState)
        assert int(state.count) == 2
        assert float(state.last_lr) == pytest.approx(0.4)


def test_l2_in_transform_equals_l2_in_loss():
    params = _params(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (6, 4))
    lam = 1e-2

    def data_loss(p):
        return jnp.sum(jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"][None, :]) ** 2) + jnp.sum(
            p["conv"]["kernel"] ** 2 * 0.1) + jnp.sum(p["bn"]["scale"] * p["bn"]["bias"])

    def loss_with_l2(p):  # Remark 1: l = λ/2·‖w‖² + ε, on the masked weights only
        mask = default_weight_decay_mask(p)
        l2 = sum(jnp.sum(w**2) for w, m in zip(jax.tree.leaves(p), jax.tree.leaves(mask)) if m)
        return data_loss(p) + 0.5 * lam * l2

    tx_in = goyal_sgd(SCHEDULE, weight_decay=lam)
    tx_loss = goyal_sgd(SCHEDULE, weight_decay=0.0)
    p_in, p_loss = params, params
    s_in, s_loss = tx_in.init(params), tx_loss.init(params)
    for _ in range(12):
        u, s_in = tx_in.update(jax.grad(data_loss)(p_in), s_in, p_in)
        p_in = optax.apply_updates(p_in, u)
        u, s_loss = tx_loss.update(jax.grad(loss_with_l2)(p_loss), s_loss, p_loss)
        p_loss = optax.apply_updates(p_loss, u)
    assert max_rel_diff(p_in, p_loss) < 1e-5  # tolerance: float32, 12 steps
    # and the decay really acted: without it the result differs
    p_none, s_none = params, tx_loss.init(params)
    for _ in range(12):
        u, s_none = tx_loss.update(jax.grad(data_loss)(p_none), s_none, p_none)
        p_none = optax.apply_updates(p_none, u)
    assert max_rel_diff(p_none, p_in) > 1e-4


def test_weight_decay_skips_bn_and_biases():
    params = _params(jax.random.key(5))
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = goyal_sgd(0.1, weight_decay=0.5, momentum=0.0, nesterov=False)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * params["conv"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * params["dense"]["kernel"], rtol=1e-6)
    for leaf in (updates["bn"]["scale"], updates["bn"]["bias"], updates["dense"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_default_mask_on_a_real_flax_resnet():
    from lsgd_jax.models import get_model

    model = get_model("resnet50", num_classes=1000)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    params = variables["params"]
    mask = default_weight_decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    decayed = [jax.tree_util.keystr(p) for p, m in flat if m]
    kept = [jax.tree_util.keystr(p) for p, m in flat if not m]
    assert decayed and kept
    assert all(s.endswith("['kernel']") for s in decayed)
    assert all(s.endswith("['scale']") or s.endswith("['bias']") for s in kept)
    # every convolution (stem 1 + 16 blocks × 3 + 4 projections = 53) and the classifier
    assert len(decayed) == 54
    assert "['fc']['kernel']" in decayed
    n_decayed = sum(int(np.prod(x.shape)) for (p, m), x in zip(flat, jax.tree.leaves(params)) if m)
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    # all but BN γ/β (2 × 26,560 ... per channel) and the 1000 FC biases
    assert n_total - n_decayed == 2 * sum(
        int(np.prod(x.shape)) for (p, m), x in zip(flat, jax.tree.leaves(params))
        if jax.tree_util.keystr(p).endswith("['scale']")) + 1000


def test_chains_with_clipping_and_multisteps():
    params = _params(jax.random.key(6))
    grads = [_grads(t, params) for t in range(8)]
    # clip_by_global_norm then goyal_sgd equals clipping by hand
    chained = optax.chain(optax.clip_by_global_norm(1.0), goyal_sgd(SCHEDULE))
    plain = goyal_sgd(SCHEDULE)
    s_c, s_p = chained.init(params), plain.init(params)
    for g in grads:
        u_c, s_c = chained.update(g, s_c, params)
        norm = optax.tree.norm(g)
        u_p, s_p = plain.update(jax.tree.map(lambda x, norm=norm: x / jnp.maximum(norm, 1.0), g), s_p, params)
        assert max_rel_diff(u_c, u_p) < 1e-6  # tolerance: float32 rounding
    # MultiSteps(every 4) equals goyal_sgd on the mean of each 4 gradients; the
    # schedule advances once per real update.
    multi = optax.MultiSteps(goyal_sgd(SCHEDULE), every_k_schedule=4)
    s_m, s_p = multi.init(params), plain.init(params)
    p_m, p_p = params, params
    for i, g in enumerate(grads):
        with jax.numpy_dtype_promotion("standard"):  # MultiSteps mixes int and float internally
            u, s_m = multi.update(g, s_m, p_m)
        p_m = optax.apply_updates(p_m, u)
        if i % 4 == 3:
            mean = jax.tree.map(lambda *xs: sum(xs) / 4, *grads[i - 3:i + 1])
            u, s_p = plain.update(mean, s_p, p_p)
            p_p = optax.apply_updates(p_p, u)
    assert max_rel_diff(p_m, p_p) < 1e-5  # tolerance: float32 mean of 4
    assert int(s_m.inner_opt_state[1].count) == 2


def test_inject_hyperparams_shows_the_rate_and_matches():
    params = _params(jax.random.key(8))
    injected = optax.inject_hyperparams(goyal_sgd)(learning_rate=SCHEDULE, form="eq10")
    plain = goyal_sgd(SCHEDULE, form="eq10")
    s_i, s_p = injected.init(params), plain.init(params)
    update = jax.jit(injected.update)
    for t in range(14):
        g = _grads(t, params)
        u_i, s_i = update(g, s_i, params)
        u_p, s_p = plain.update(g, s_p, params)
        assert float(s_i.hyperparams["learning_rate"]) == pytest.approx(float(SCHEDULE(t)), rel=1e-6)
        assert max_rel_diff(u_i, u_p) < 1e-5  # tolerance: float32 rounding
    # A callable mask is not a schedule when declared static.
    mask_fn = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = optax.inject_hyperparams(goyal_sgd, static_args="weight_decay_mask")(
        learning_rate=0.1, weight_decay_mask=mask_fn)
    u, _ = tx.update(_grads(0, params), tx.init(params), params)
    assert jax.tree.structure(u) == jax.tree.structure(params)


def test_second_update_does_not_recompile():
    params = _params(jax.random.key(9))
    tx = goyal_sgd(SCHEDULE, form="eq10")
    step = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        _, state = step(_grads(t, params), state, params)
    assert compilations(step) == 1


def test_bfloat16_params_keep_their_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(jax.random.key(10)))
    for form in ("eq9", "eq10"):
        tx = goyal_sgd(SCHEDULE, form=form)
        updates, state = tx.update(_grads(0, params), tx.init(params), params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(state[1].momentum))


@pytest.mark.parametrize(
    "factory,kwargs,name",
    [
        (momentum_sgd, dict(momentum=1.0), "momentum"),
        (momentum_sgd, dict(momentum=-0.1), "momentum"),
        (momentum_sgd, dict(form="eq11"), "form"),
        (goyal_sgd, dict(momentum=1.5), "momentum"),
        (goyal_sgd, dict(form="caffe2"), "form"),
        (goyal_sgd, dict(weight_decay=-1e-4), "weight_decay"),
    ],
)
def test_bad_arguments(factory, kwargs, name):
    with pytest.raises(ValueError) as err:
        factory(0.1, **kwargs)
    assert name in str(err.value) and repr(kwargs[name]) in str(err.value)


def test_docstrings_state_the_paper_equations():
    assert "eq. (9)" in momentum_sgd.__doc__ and "eq. (10)" in momentum_sgd.__doc__
    assert "u ← m·u + g" in momentum_sgd.__doc__
    assert "Remark 1" in goyal_sgd.__doc__


_shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(shapes=_shapes, kn=st.sampled_from([512, 2048, 16384]), nesterov=st.booleans(),
       m=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_eq10_corrected_equals_eq9_on_random_trees(shapes, kn, nesterov, m, seed):
    key = jax.random.key(seed)
    params = {f"p{i}": jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)}
    schedule = goyal_schedule(batch_size=kn, steps_per_epoch=1, warmup_epochs=4, decay_epochs=(6,))
    a = _run(goyal_sgd(schedule, momentum=m, nesterov=nesterov, form="eq9"), params, 9)
    b = _run(goyal_sgd(schedule, momentum=m, nesterov=nesterov, form="eq10"), params, 9)
    # tolerance: float32 reassociation over 9 steps
    assert max_rel_diff(b[-1], a[-1]) < 5e-5
