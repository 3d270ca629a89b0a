"""The model's speed switches compute what the default model computes.

Each switch (split or custom-VJP grouped BN, the elementwise max-pool backward, the
padded and space-to-depth stems) is compared with today's code: forward outputs,
gradients, running-average updates and the evaluation path, for BN groups of 2
images and for one group spanning the whole batch. Tolerances are float32 rounding
(different summation orders), stated as a fraction of the largest magnitude.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgd_jax.models import BasicBlock, GroupBatchNorm, ResNet, get_model
from lsgd_jax.models.grouped_bn import group_bn_custom_vjp, group_bn_split, split_rows
from lsgd_jax.models.pooling import max_pool
from lsgd_jax.models.stem import StemConv

# tolerance: float32 sums in a different order, relative to the largest magnitude
# (measured ~1e-6 here; a wrong formula or a wrong tie gives O(1)).
RTOL = 1e-4


def _assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


def _reference_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _pool_grads(x, cotangent):
    ref = jax.grad(lambda x: jnp.sum(_reference_pool(x) * cotangent))(x)
    ours = jax.grad(lambda x: jnp.sum(max_pool(x) * cotangent))(x)
    return ours, ref


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
@pytest.mark.parametrize("kind", ["constant", "integers", "normal", "minus_inf", "bfloat16"])
def test_max_pool_gradient_equals_select_and_scatter_ties_included(shape, kind):
    """Ties go to the first maximum in row-major window order; the −∞ pad takes part."""
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    x = {"constant": np.full(shape, 2.0),
         "integers": rng.integers(0, 3, shape),  # many ties between and within windows
         "normal": rng.normal(size=shape),
         "minus_inf": np.full(shape, -np.inf),   # maxima of -inf: the pad may come first
         "bfloat16": rng.integers(-2, 2, shape)}[kind]
    x = jnp.asarray(x, dtype)
    y = max_pool(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(_reference_pool(x), np.float32))
    # Integer cotangents: every sum is exact, so the gradients must be identical.
    cotangent = jnp.asarray(rng.integers(-4, 5, y.shape), dtype)
    ours, ref = _pool_grads(x, cotangent)
    assert ours.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
    assert np.abs(np.asarray(ref, np.float32)).sum() > 0  # the comparison saw gradients


def test_max_pool_rejects_bad_geometry():
    with pytest.raises(ValueError, match="pad < window"):
        max_pool(jnp.zeros((1, 4, 4, 1)), (3, 3), (2, 2), ((3, 3), (1, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        max_pool(jnp.zeros((4, 4, 1)))


def test_split_rows_hand_table():
    # ResNet-50, groups of 32: 56² (3,136 rows per image), 7², and the 112² stem.
    assert split_rows(32 * 56 * 56, 4096) == 3584   # 7 · 512
    assert split_rows(32 * 7 * 7, 4096) == 1568     # no split needed
    assert split_rows(32 * 112 * 112, 4096) == 4096
    assert split_rows(256 * 7 * 7, 4096) == 3136
    assert split_rows(7, 4) == 1                     # a prime: one row per stage
    with pytest.raises(ValueError, match="limit"):
        split_rows(8, 0)


def _bn_case(batch, group, split, impl, dtype=jnp.float32):
    """Outputs, state updates and gradients of GroupBatchNorm(impl) on a fixed batch."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(batch, 4, 6, 5)) * 2.0 + np.arange(batch)[:, None, None, None] * 0.5
    x = jnp.asarray(x, jnp.float32).astype(dtype)
    cotangent = jnp.asarray(rng.normal(size=x.shape), dtype)
    bn = GroupBatchNorm(group_size=group, impl=impl, split_rows=split, dtype=dtype)
    variables = bn.init(jax.random.key(0), x, train=False)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}

    def loss(params, x):
        y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * cotangent.astype(jnp.float32)), (y, updates)

    (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x)
    y_eval = bn.apply({"params": params, **updates}, x, train=False)
    return y, updates, grads, y_eval


@pytest.mark.parametrize("impl", ["split", "custom_vjp"])
@pytest.mark.parametrize("group, split", [
    (2, 8),        # groups of 2 images, 48 rows each reduced as 6 × 8
    (2, 4096),     # groups of 2, one stage
    (None, 7),     # one group spanning the batch: 192 rows, the largest divisor <= 7 is 6
    (8, 4096),     # the same group given as a size
])
def test_group_batch_norm_impls_equal_plain(impl, group, split):
    ref = _bn_case(8, group, split, "plain")
    got = _bn_case(8, group, split, impl)
    names = ("output", "running averages", "gradients", "evaluation output")
    for name, a, b in zip(names, got, ref):
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            _assert_close(leaf_a, leaf_b, what=f"{impl} {name}")


@pytest.mark.parametrize("impl", ["split", "custom_vjp"])
def test_group_batch_norm_impls_bfloat16(impl):
    y, updates, grads, _ = _bn_case(8, 2, 8, impl, jnp.bfloat16)
    y_ref, updates_ref, grads_ref, _ = _bn_case(8, 2, 8, "plain", jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
    # Statistics in float32 from the same bf16 inputs: equal to float32 rounding.
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_ref)):
        _assert_close(a, b, what="running averages")
    # tolerance: outputs and input gradients are rounded to bf16 (8 bits) once.
    _assert_close(y, y_ref, rtol=2 ** -7, what="bf16 output")
    _assert_close(grads[1], grads_ref[1], rtol=2 ** -6, what="bf16 input gradient")


def test_custom_vjp_backward_includes_the_statistics_cotangents():
    """A loss of (y, μ, σ²): the hand-written backward equals autodiff of the same forward."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(6, 3, 4, 5)) + 1.0, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32)
    bias = jnp.asarray(rng.normal(size=5), jnp.float32)
    w_mean = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    w_var = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, num_groups=3, epsilon=1e-5, dtype=jnp.float32,
                              limit=4)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean * w_mean) + jnp.sum(var * w_var)
        return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

    for a, b in zip(loss(group_bn_custom_vjp), loss(group_bn_split)):
        _assert_close(a, b, what="custom_vjp gradient")


def test_split_statistics_stay_two_stage_after_xla():
    """XLA merges a reduce of a reduce into one; the barrier keeps the (groups, S, C) stage."""
    x = jnp.ones((4, 4, 6, 5), jnp.float32)
    fn = jax.jit(lambda x: group_bn_split(x, jnp.ones(5), jnp.zeros(5), num_groups=2,
                                          epsilon=1e-5, dtype=jnp.float32, limit=8))
    hlo = fn.lower(x).compile().as_text()
    # 2 groups of 48 rows, R = 8, S = 6: partial sums f32[2,6,5] must exist.
    assert "f32[2,6,5]" in hlo and " reduce(" in hlo


def _stem_model(impl, channels):
    return StemConv(8, 7 if channels == 3 else 3, 2 if channels == 3 else 1, impl,
                    kernel_init=nn.initializers.normal(0.1))


@pytest.mark.parametrize("impl, channels", [("pad4", 3), ("pad4", 1), ("s2d", 3)])
def test_stem_impls_equal_nn_conv(impl, channels):
    size, stride = (7, 2) if channels == 3 else (3, 1)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 16, 12, channels)), jnp.float32)
    ref = nn.Conv(8, (size, size), strides=(stride, stride),
                  padding=((size // 2, size // 2),) * 2, use_bias=False,
                  kernel_init=nn.initializers.normal(0.1))
    ours = _stem_model(impl, channels)
    v_ref = ref.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(0), x)
    # The same parameter (name, shape, initial values): checkpoints load either way.
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_ref["params"]["kernel"])
    cotangent = jnp.asarray(rng.normal(size=ref.apply(v_ref, x).shape), jnp.float32)

    def grads(module):
        return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * cotangent), argnums=(0, 1))(
            v_ref, x)

    _assert_close(ours.apply(v_ref, x), ref.apply(v_ref, x), what="stem output")
    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref))):
        _assert_close(a, b, what="stem gradient")


def test_space_to_depth_stem_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="even image sizes.*15x16"):
        _stem_model("s2d", 3).init(jax.random.key(0), jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="imagenet stem"):
        get_model("resnet20", num_classes=10, stem_impl="s2d").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def test_get_model_rejects_bad_switches():
    with pytest.raises(ValueError, match="bn_impl .* 'fast'"):
        get_model("resnet50", num_classes=10, bn_impl="fast")
    with pytest.raises(ValueError, match="pool_impl"):
        get_model("resnet50", num_classes=10, pool_impl="scatter")
    with pytest.raises(ValueError, match="stem_impl"):
        get_model("resnet50", num_classes=10, stem_impl="pad8")
    with pytest.raises(ValueError, match="bn_split_rows"):
        get_model("resnet50", num_classes=10, bn_split_rows=0)


LEVERS = {
    "bn_split": dict(bn_impl="split", bn_split_rows=24),
    "bn_custom_vjp": dict(bn_impl="custom_vjp", bn_split_rows=24),
    "pool_masks": dict(pool_impl="masks"),
    "stem_pad4": dict(stem_impl="pad4"),
    "stem_s2d": dict(stem_impl="s2d"),
    "all": dict(bn_impl="custom_vjp", bn_split_rows=24, pool_impl="masks", stem_impl="s2d"),
}


def _resnet_step(switches, group):
    """One train-mode forward/backward of a small ImageNet-stem ResNet, then evaluation."""
    model = ResNet(stage_sizes=(1, 1), block=BasicBlock, num_filters=8, num_classes=10,
                   bn_group_size=group, zero_init_residual=False, **switches)
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))

    @jax.jit
    def run(variables):
        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats":
                                           variables["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])
            return jnp.sum(jnp.square(logits)), (logits, updates)

        (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(
            variables["params"])
        logits_eval = model.apply({"params": variables["params"], **updates}, x, train=False)
        return logits, updates, grads, logits_eval

    return variables, run(variables)


@pytest.fixture(scope="module")
def default_steps():
    return {group: _resnet_step({}, group) for group in (2, None)}


@pytest.mark.parametrize("group", [2, None])
@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_resnet_with_lever_equals_default(default_steps, lever, group):
    variables_ref, ref = default_steps[group]
    variables, got = _resnet_step(LEVERS[lever], group)
    # Same parameter and state trees, same initial values.
    assert jax.tree.structure(variables) == jax.tree.structure(variables_ref)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_ref)):
        np.testing.assert_array_equal(a, b)
    names = ("logits", "running averages", "gradients", "evaluation logits")
    for name, a, b in zip(names, got, ref):
        for (path, leaf_a), leaf_b in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                          jax.tree.leaves(b)):
            _assert_close(leaf_a, leaf_b, what=f"{lever} {name} {jax.tree_util.keystr(path)}")


# --- the trainer's flags for the switches ---

def test_the_switches_are_flags_checked_before_anything_runs():
    from lsgd_jax.training.config import FREE_FIELDS, TrainConfig

    with pytest.raises(ValueError, match=r"bn_impl must be one of \('plain', 'split', "
                                         r"'custom_vjp'\), got 'fused'"):
        TrainConfig(bn_impl="fused")
    with pytest.raises(ValueError, match=r"--bn-split-rows must be an integer in \[1, 2147483647\], got 0"):
        TrainConfig(bn_split_rows=0)
    with pytest.raises(ValueError, match="model resnet8 has the CIFAR stem"):
        TrainConfig(model="resnet8", stem_impl="s2d")
    TrainConfig(model="resnet50", stem_impl="s2d", pool_impl="masks")  # the ImageNet stem
    # How, not what: a resume may change them (the trees and the results are the same).
    assert {"bn_impl", "bn_split_rows", "pool_impl", "stem_impl"} <= FREE_FIELDS


def test_the_trainer_builds_its_model_with_the_switches_and_gets_the_same_losses(
        tmp_path, monkeypatch):
    """Four steps of the tiny run with every switch against the default code: the model
    gets the flags' values, and the logged losses agree to float32 rounding."""
    import lsgd_jax.training.loop as train
    from lsgd_jax.training.config import TrainConfig
    from lsgd_jax.training.metrics import read_metrics

    built = []
    real = train.get_model

    def recording(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "get_model", recording)
    tiny = dict(data="synthetic", model="resnet8", image_size=32, batch_size=32,
                bn_group_size=4, synthetic_examples=128, synthetic_eval_examples=32,
                eval_batch_size=32, dtype="float32", epochs=1, warmup_epochs=0,
                decay_epochs=(), log_every_steps=1, median_evals=1)
    levers = dict(bn_impl="custom_vjp", bn_split_rows=8, pool_impl="masks", stem_impl="pad4")
    lines = []
    losses = {}
    for name, extra in (("default", {}), ("levers", levers)):
        train.train_and_evaluate(TrainConfig(**tiny, **extra), str(tmp_path / name),
                                 log=lines.append)
        losses[name] = [r["loss"] for r in read_metrics(str(tmp_path / name), "train")]
    assert {k: built[1][k] for k in levers} == levers
    assert "bn_impl" not in built[0] or built[0]["bn_impl"] == "plain"
    assert len(losses["default"]) == 4
    _assert_close(losses["levers"], losses["default"], what="losses")
    assert any(line.startswith("speed switches (the same results, computed another way): "
                               "--bn-impl custom_vjp, --bn-split-rows 8, --pool-impl masks, "
                               "--stem-impl pad4") for line in lines)
