"""ResNets of the paper: sizes, initialization, zero-γ, strides, per-group BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsgd_jax.models import (
    BasicBlock,
    Bottleneck,
    GroupBatchNorm,
    ResNet,
    get_model,
)


def _init(model, shape):
    """Jitted init; the "rbg" generator compiles several times faster than threefry on CPU."""
    return jax.jit(
        lambda k: model.init(k, jnp.zeros(shape, jnp.float32), train=False)
    )(jax.random.key(0, impl="rbg"))


def _param_count(model, shape):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, expected",
    [
        # Counts of the torchvision / fb.resnet.torch models with 1000 classes.
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
    ],
)
def test_imagenet_parameter_counts(name, expected):
    model = get_model(name, num_classes=1000)
    assert _param_count(model, (1, 224, 224, 3)) == expected


def test_resnet20_shapes_and_dtypes():
    model = get_model("resnet20", num_classes=10, dtype="bfloat16", bn_group_size=4)
    x = jnp.ones((8, 28, 28, 1), jnp.float32)
    variables = _init(model, x.shape)
    logits, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    assert logits.shape == (8, 10) and logits.dtype == jnp.float32
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32
    for leaf in jax.tree.leaves(updates["batch_stats"]):
        assert leaf.dtype == jnp.float32
    # 3 stages of 16/32/64 filters: the last block ends with 64 channels.
    assert variables["params"]["stage3_block3"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 16)


def test_bfloat16_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3), jnp.float32)
    kw = dict(stage_sizes=(1, 1), block=BasicBlock, num_filters=8, stem="cifar",
              num_classes=10, bn_group_size=4, zero_init_residual=False)
    f32, bf16 = ResNet(**kw), ResNet(**kw, dtype=jnp.bfloat16)
    variables = _init(f32, x.shape)
    a, b = jax.jit(lambda v: (
        f32.apply(v, x, train=True, mutable=["batch_stats"])[0],
        bf16.apply(v, x, train=True, mutable=["batch_stats"])[0],
    ))(variables)
    # tolerance: bf16 has 8 mantissa bits; 5 layers of rounding on O(1) activations.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.05 * float(jnp.abs(a).max()))
    assert b.dtype == jnp.float32
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # bf16 really computed in bf16


@pytest.mark.parametrize("zero_init_residual", [True, False])
@pytest.mark.parametrize("block, last_bn", [(BasicBlock, "bn2"), (Bottleneck, "bn3")])
def test_zero_gamma_on_last_bn_of_each_block(block, last_bn, zero_init_residual):
    model = ResNet(stage_sizes=(2, 1), block=block, num_filters=4, stem="cifar",
                   num_classes=3, zero_init_residual=zero_init_residual)
    params = _init(model, (1, 8, 8, 3))["params"]
    n_last = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if names[-1] != "scale":
            continue
        if names[-2] == last_bn:
            n_last += 1
            expected = 0.0 if zero_init_residual else 1.0
        else:  # stem BN, inner BNs and projection-shortcut BNs keep γ = 1
            expected = 1.0
        np.testing.assert_array_equal(np.asarray(leaf), expected, err_msg=str(names))
    assert n_last == 3


def test_fb_resnet_torch_initialization():
    model = ResNet(stage_sizes=(2,), block=BasicBlock, num_filters=128, stem="cifar",
                   num_classes=1000)
    params = _init(model, (1, 8, 8, 3))["params"]
    w = np.asarray(params["stage1_block2"]["conv1"]["kernel"])  # 3x3x128x128
    he_std = np.sqrt(2.0 / (3 * 3 * 128))  # fan-out: kH·kW·c_out
    # tolerance: 147k samples, the sample std is within ~0.5% of the true one.
    np.testing.assert_allclose(w.std(), he_std, rtol=0.02)
    # Plain (not truncated) normal: about 4.55% of samples beyond 2σ.
    assert 0.04 < np.mean(np.abs(w) > 2 * he_std) < 0.051
    fc = params["fc"]  # 128x1000
    np.testing.assert_allclose(np.asarray(fc["kernel"]).std(), 0.01, rtol=0.02)
    np.testing.assert_array_equal(np.asarray(fc["bias"]), 0.0)
    convs = [
        p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if "conv" in p[-2].key and p[-1].key == "bias"
    ]
    assert convs == []  # no convolution biases


def test_bottleneck_strides_on_3x3_conv():
    model = ResNet(stage_sizes=(1, 1), block=Bottleneck, num_filters=4, stem="cifar", num_classes=3)
    x = jnp.zeros((2, 8, 8, 3))
    variables = _init(model, x.shape)
    _, state = jax.jit(lambda v: model.apply(v, x, train=False, capture_intermediates=True,
                                             mutable=["intermediates"]))(variables)
    block = state["intermediates"]["stage2_block1"]
    assert block["conv1"]["__call__"][0].shape == (2, 8, 8, 8)  # 1x1, stride 1
    assert block["conv2"]["__call__"][0].shape == (2, 4, 4, 8)  # 3x3, stride 2
    assert block["conv3"]["__call__"][0].shape == (2, 4, 4, 32)
    assert block["proj_conv"]["__call__"][0].shape == (2, 4, 4, 32)


def _bn_reference(x, gamma, beta, group, eps=1e-5):
    """Per-group BN written out in numpy (float64)."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    means, variances = [], []
    for start in range(0, x.shape[0], group):
        g = x[start:start + group]
        mu = g.mean(axis=(0, 1, 2))
        var = g.var(axis=(0, 1, 2))
        out[start:start + group] = (g - mu) / np.sqrt(var + eps) * gamma + beta
        means.append(mu)
        variances.append(var)
    return out, np.mean(means, axis=0), np.mean(variances, axis=0)


def _bn_variables(bn, x, rng):
    variables = bn.init(jax.random.key(0), x, train=False)
    c = x.shape[-1]
    variables = {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
        },
        "batch_stats": variables["batch_stats"],
    }
    return variables


def test_group_batch_norm_matches_per_group_reference():
    rng = np.random.default_rng(0)
    # Groups with very different statistics, so pooling would be visibly wrong.
    x = rng.normal(size=(12, 3, 3, 5)) * np.repeat([1.0, 3.0, 0.5], 4)[:, None, None, None]
    x = jnp.asarray(x + np.repeat([0.0, 2.0, -1.0], 4)[:, None, None, None], jnp.float32)
    bn = GroupBatchNorm(group_size=4)
    variables = _bn_variables(bn, x, rng)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    gamma = np.asarray(variables["params"]["scale"])
    beta = np.asarray(variables["params"]["bias"])
    ref, mean, var = _bn_reference(x, gamma, beta, 4)
    # tolerance: float32 one-pass variance on O(1) data.
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    pooled, _, _ = _bn_reference(x, gamma, beta, 12)
    assert np.abs(np.asarray(y) - pooled).max() > 0.5
    # Running averages: momentum 0.9 from (0, 1), towards the mean over groups.
    stats = updates["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)

    # Evaluation uses the running averages.
    y_eval = bn.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
    ref_eval = (np.asarray(x, np.float64) - np.asarray(stats["mean"])) / np.sqrt(
        np.asarray(stats["var"]) + 1e-5
    ) * gamma + beta
    np.testing.assert_allclose(np.asarray(y_eval), ref_eval, rtol=1e-5, atol=1e-5)


def test_group_batch_norm_bfloat16_keeps_float32_statistics():
    rng = np.random.default_rng(1)
    x32 = jnp.asarray(rng.normal(size=(8, 2, 2, 3)) * 4.0 + 10.0, jnp.float32)
    x = x32.astype(jnp.bfloat16)
    bn = GroupBatchNorm(group_size=4, dtype=jnp.bfloat16)
    variables = _bn_variables(bn, x, rng)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
    # Statistics of the bf16 inputs computed in float32 (no bf16 accumulation).
    _, mean, _ = _bn_reference(np.asarray(x.astype(jnp.float32)), 1.0, 0.0, 4)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)


def test_group_batch_norm_rejects_indivisible_batch():
    bn = GroupBatchNorm(group_size=4)
    x = jnp.ones((6, 2, 2, 3))
    variables = bn.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="batch of 6 .* group_size=4"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_get_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resnet50"):
        get_model("resnet51", num_classes=10)
    with pytest.raises(ValueError, match="dtype"):
        get_model("resnet20", num_classes=10, dtype="float16")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="bn_group_size"):
        get_model("resnet20", num_classes=10, bn_group_size=0)


@pytest.fixture(scope="module")
def built_models():
    """ResNet-50 (at 32 pixels, to keep the CPU busy for seconds only) and ResNet-20, as
    get_model builds them, with γ = 1 everywhere so that every BN passes its input on."""
    out = {}
    for name in ("resnet50", "resnet20"):
        model = get_model(name, num_classes=10, zero_init_residual=False)
        out[name] = (model, _init(model, (1, 32, 32, 3)))
    return out


def test_convolution_init_is_he_fan_out_where_fan_in_differs(built_models):
    """fb.resnet.torch draws N(0, 2 / (kH·kW·c_out)); fan-in would give 4× the variance here."""
    _, variables = built_models["resnet50"]
    block = variables["params"]["stage1_block1"]
    w = np.asarray(block["conv3"]["kernel"])  # 1×1, 64 → 256
    assert w.shape == (1, 1, 64, 256)
    # tolerance: ≥ 16k samples, the sample std is within ~1 % of the true one.
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / 256), rtol=0.05)
    w = np.asarray(variables["params"]["stage2_block1"]["conv1"]["kernel"])  # 1×1, 256 → 128
    assert w.shape == (1, 1, 256, 128)
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / 128), rtol=0.05)
    assert abs(w.std() - np.sqrt(2.0 / 256)) > 0.2 * np.sqrt(2.0 / 256)  # not fan-in


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_batch_norm_momentum_and_epsilon_are_the_papers(built_models, name):
    """Running averages with momentum 0.9 and ε = 1e-5, measured on the built model.

    Momentum: in training, BN normalizes with the batch's statistics, so two updates on
    one batch see the same inputs: mean₁ = (1−m)·μ, mean₂ = m·mean₁ + (1−m)·μ, and
    mean₂ / mean₁ = 1 + m in every BN layer. ε: in evaluation with running mean 0 and
    variance 0, γ = 1, β = 0, the stem BN maps x to x / sqrt(ε).
    """
    model, variables = built_models[name]
    x = jax.random.normal(jax.random.key(1), (32, 32, 32, 3), jnp.float32)

    def update(stats):
        _, new = model.apply({"params": variables["params"], "batch_stats": stats}, x,
                             train=True, mutable=["batch_stats"])
        return new["batch_stats"]

    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    first = update(zeros)
    second = update(first)
    ratios = []
    for path, m1 in jax.tree_util.tree_flatten_with_path(first)[0]:
        if path[-1].key != "mean":
            continue
        m2 = second
        for p in path:
            m2 = m2[p.key]
        m1, m2 = np.asarray(m1), np.asarray(m2)
        big = np.abs(m1) > 1e-3 * np.abs(m1).max()
        ratios.append(np.median(m2[big] / m1[big]))
    assert len(ratios) >= 20
    # tolerance: float32 rounding of the two updates.
    np.testing.assert_allclose(ratios, 1.9, rtol=1e-4)

    stats = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, inter = model.apply({"params": variables["params"], "batch_stats": stats}, x[:2],
                           train=False, capture_intermediates=True, mutable=["intermediates"])
    conv = np.asarray(inter["intermediates"]["stem_conv"]["__call__"][0])
    bn = np.asarray(inter["intermediates"]["stem_bn"]["__call__"][0])
    big = np.abs(conv) > 1e-3
    eps = np.median((conv[big] / bn[big]) ** 2)
    np.testing.assert_allclose(eps, 1e-5, rtol=1e-3)
