"""The synchronous SGD step and the eval step against single-device math.

Every equivalence runs a tiny ResNet (BatchNorm in every layer, projection
shortcut) with goyal_sgd (Nesterov momentum, L2 weight decay) on 8 fake CPU
devices and compares with a reference written without shard_map, scan or
meshes: one plain ``jax.grad`` per worker of n images on one device.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compilations, max_tree_diff, mesh_of, tiny_resnet, tree_allclose

from lsgd_jax.engine.step import (
    create_train_state,
    make_eval_step,
    make_train_step,
    validate_batch_layout,
)
from lsgd_jax.parallel.distributed import host_to_global, make_mesh, replicated_sharding
from lsgd_jax.rules.optim import goyal_sgd
from lsgd_jax.rules.schedules import scaled_learning_rate

SHAPE = (8, 8, 3)  # H, W, C
CLASSES = 10
# Float images are used as given; these only matter for uint8 input.
NO_NORM = dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
# tolerance: float32 sums over devices/microbatches in a different order,
# carried through a few steps of momentum SGD.
TOL = dict(rtol=1e-4, atol=2e-6)


# Compiling dominates this file's time on CPU: models, optimizers and steps are
# built once per configuration and shared between tests.
@functools.lru_cache(maxsize=None)
def tiny_model(bn_group_size, dtype=jnp.float32):
    return tiny_resnet(bn_group_size, num_classes=CLASSES, dtype=dtype)


def tiny_tx(lr=0.1):
    return _tiny_tx(float(lr))


@functools.lru_cache(maxsize=None)
def _tiny_tx(lr):
    return goyal_sgd(lr, weight_decay=5e-3)  # large λ so a wrong decay would show


@functools.lru_cache(maxsize=None)
def engine_step(model, tx, num_devices, grad_accum_steps, kn, pixel_mean=(0.0, 0.0, 0.0),
                pixel_std=(1.0, 1.0, 1.0)):
    mesh = mesh_of(num_devices)
    return make_train_step(model, tx, mesh, global_batch_size=kn,
                           bn_group_size=model.bn_group_size,
                           grad_accum_steps=grad_accum_steps, pixel_mean=pixel_mean,
                           pixel_std=pixel_std)


@functools.lru_cache(maxsize=None)
def engine_eval_step(model, num_devices=8):
    return make_eval_step(model, mesh_of(num_devices), **NO_NORM)


def batches(kn, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        # Per-example offsets and scales, so BN groups see different statistics.
        x = rng.normal(size=(kn,) + SHAPE) * rng.uniform(0.5, 2.0, (kn, 1, 1, 1))
        x += rng.normal(size=(kn, 1, 1, 1))
        out.append({"image": x.astype(np.float32),
                    "label": rng.integers(0, CLASSES, kn).astype(np.int32)})
    return out


@functools.lru_cache(maxsize=None)
def _initial_state(model, tx):
    # "rbg" compiles much faster than threefry on CPU; one init per (model, tx).
    state = create_train_state(model, tx, rng=jax.random.key(0, impl="rbg"),
                               input_shape=(1,) + SHAPE, mesh=make_mesh())
    assert_replicated(state)
    return jax.device_get(state)


def init_state(model, tx, mesh):
    return jax.device_put(_initial_state(model, tx), replicated_sharding(mesh))


def run_engine(model, tx, devices, data, *, grad_accum_steps=1):
    mesh = make_mesh(devices)
    kn = data[0]["label"].shape[0]
    step = engine_step(model, tx, len(devices), grad_accum_steps, kn)
    state = init_state(model, tx, mesh)
    metrics = []
    for batch in data:
        state, m = step(state, host_to_global(batch, mesh))
        metrics.append(m)
    return state, jax.device_get(metrics)


@functools.lru_cache(maxsize=None)
def reference_step(model, tx, n):
    """Goyal et al. math on one device: per worker of n images, loss_w = Σ CE / kn."""
    whole = model.clone(bn_group_size=None)  # BN over exactly what it is given

    def worker_loss(params, batch_stats, x, y, kn):
        logits, updates = whole.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.sum() / kn, (updates["batch_stats"], ce.sum(), jnp.argmax(logits, -1) != y)

    @jax.jit
    def step(state, batch):
        kn = batch["label"].shape[0]
        # One plain gradient per worker (vmap over workers), summed: the all-reduce.
        x = batch["image"].reshape((kn // n, n) + batch["image"].shape[1:])
        y = batch["label"].reshape(kn // n, n)
        g, (stats, ce, wrong) = jax.vmap(
            jax.grad(worker_loss, has_aux=True), in_axes=(None, None, 0, 0, None)
        )(state.params, state.batch_stats, x, y, kn)
        grads = jax.tree.map(lambda t: t.sum(0), g)
        # The paper: running averages of all workers averaged.
        batch_stats = jax.tree.map(lambda t: t.mean(0), stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
        metrics = {"loss": ce.sum() / kn, "top1_error": jnp.mean(wrong),
                   "grad_norm": optax.tree.norm(grads)}
        return new, metrics

    return step


def run_reference(model, tx, data, n):
    state = init_state(model, tx, mesh_of(1))
    metrics = []
    for batch in data:
        state, m = reference_step(model, tx, n)(state, batch)
        metrics.append(m)
    return state, jax.device_get(metrics)


def assert_replicated(tree):
    for leaf in jax.tree.leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == len(leaf.sharding.device_set)
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0])


def test_devices_equal_accumulated_microbatches():
    """8 devices × n = 2 equals 1 device accumulating 8 microbatches of n = 2."""
    model, tx = tiny_model(2), tiny_tx()
    data = batches(16, steps=3)
    dist, m_dist = run_engine(model, tx, jax.devices(), data)
    accum, m_accum = run_engine(model, tx, jax.devices()[:1], data, grad_accum_steps=8)
    assert int(dist.step) == int(accum.step) == 3
    tree_allclose(dist.params, accum.params, **TOL)
    tree_allclose(dist.batch_stats, accum.batch_stats, **TOL)
    tree_allclose(dist.opt_state, accum.opt_state, **TOL)
    tree_allclose(m_dist, m_accum, **TOL)
    assert all(bool(m["finite"]) for m in m_dist)
    jitted = engine_step(model, tx, 8, 1, 16).jitted
    assert compilations(jitted) == 1  # three steps, one compilation
    # The BN averages really moved and the step really trained.
    assert max_tree_diff(dist.batch_stats, init_state(model, tx, make_mesh()).batch_stats) > 0.01
    # Stored state is identical on every device after every step.
    assert_replicated(dist.batch_stats)
    assert_replicated(dist.params)


def test_accumulation_on_many_devices_matches_reference():
    """4 devices × K = 2 microbatches × 2 BN groups of n = 2: 16 workers."""
    model, tx = tiny_model(2), tiny_tx()
    data = batches(32, steps=2, seed=1)
    state, metrics = run_engine(model, tx, jax.devices()[:4], data, grad_accum_steps=2)
    ref, ref_metrics = run_reference(model, tx, data, n=2)
    tree_allclose(state.params, ref.params, **TOL)
    tree_allclose(state.batch_stats, ref.batch_stats, **TOL)
    for m, r in zip(metrics, ref_metrics):
        for key in r:
            np.testing.assert_allclose(m[key], r[key], **TOL)


def test_per_worker_bn_equals_reference_and_differs_from_pooled():
    model, tx = tiny_model(2), tiny_tx()
    data = batches(16, steps=1, seed=2)
    state, metrics = run_engine(model, tx, jax.devices(), data)
    per_worker, ref_metrics = run_reference(model, tx, data, n=2)
    pooled, _ = run_reference(model, tx, data, n=16)  # BN over all 16 images
    tree_allclose(state.params, per_worker.params, **TOL)
    tree_allclose(state.batch_stats, per_worker.batch_stats, **TOL)
    for key in ("loss", "top1_error", "grad_norm"):
        np.testing.assert_allclose(metrics[0][key], ref_metrics[0][key], **TOL)
    # Pooling statistics over devices is a different model: far outside tolerance.
    assert max_tree_diff(state.params, pooled.params) > 1e-3
    assert max_tree_diff(state.batch_stats, pooled.batch_stats) > 1e-3


@pytest.mark.parametrize("num_devices", [4, 8])
def test_more_devices_with_scaled_rate_match_single_device_math(num_devices):
    """Doubling the devices at n = 2 per device, with η ∝ kn, is the kn-batch math.

    The engine gets its rate from the linear scaling rule; the reference gets the
    rate written out by hand (0.1 per 16 images), so a wrong rule fails here.
    """
    kn = 2 * num_devices
    tx = tiny_tx(scaled_learning_rate(0.1, kn, reference_batch_size=16))
    by_hand = {8: 0.05, 16: 0.1}[kn]
    model = tiny_model(2)
    data = batches(kn, steps=2, seed=3)
    state, _ = run_engine(model, tx, jax.devices()[:num_devices], data)
    ref, _ = run_reference(model, tiny_tx(by_hand), data, n=2)
    tree_allclose(state.params, ref.params, **TOL)
    tree_allclose(state.opt_state, ref.opt_state, **TOL)


def test_uint8_images_are_normalized_on_device():
    model, tx = tiny_model(2), tiny_tx()
    mesh = make_mesh()
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, (16,) + SHAPE).astype(np.uint8)
    labels = rng.integers(0, CLASSES, 16).astype(np.int32)
    normalized = ((raw.astype(np.float64) - mean) / std).astype(np.float32)

    uint8_step = engine_step(model, tx, 8, 1, 16, mean, std)
    a, _ = uint8_step(init_state(model, tx, mesh),
                      host_to_global({"image": raw, "label": labels}, mesh))
    b, _ = engine_step(model, tx, 8, 1, 16)(
        init_state(model, tx, mesh), host_to_global({"image": normalized, "label": labels}, mesh))
    # tolerance: float32 normalization (multiply-add) against float64.
    tree_allclose(a.params, b.params, rtol=1e-5, atol=1e-6)

    eval_step = make_eval_step(model, mesh, pixel_mean=mean, pixel_std=std)
    mask = np.ones(16, np.float32)
    ea = eval_step(a, {"image": raw, "label": labels, "mask": mask})
    eb = engine_eval_step(model)(a, {"image": normalized, "label": labels, "mask": mask})
    assert int(ea["top1_errors"]) == int(eb["top1_errors"])
    np.testing.assert_allclose(float(ea["loss_sum"]), float(eb["loss_sum"]), rtol=1e-5)


def test_non_finite_step_keeps_the_input_state():
    model, tx = tiny_model(2), tiny_tx()
    mesh = make_mesh()
    step = engine_step(model, tx, 8, 1, 16)
    state = init_state(model, tx, mesh)
    good, bad = batches(16, steps=2, seed=5)
    state, m = step(state, good)
    assert bool(m["finite"])
    before = jax.device_get(state)
    bad["image"][3, 0, 0, 0] = np.nan
    state, m = step(state, bad)  # the input state is donated; `before` is a copy
    assert not bool(m["finite"])
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) == 1
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)
    state, m = step(state, good)
    assert bool(m["finite"]) and int(state.step) == 2


class _SqrtAtZero(nn.Module):
    """A classifier plus sqrt(w) at w = 0: the loss is finite, d/dw is not."""

    bn_group_size: int | None = 2  # no BN: any n is consistent

    @nn.compact
    def __call__(self, x, train):
        del train
        w = self.param("w", nn.initializers.zeros, (CLASSES,))
        logits = nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))
        return logits + jnp.sqrt(w)[None, :]


def _assert_step_refused(model, tx, batch):
    mesh = make_mesh()
    step = make_train_step(model, tx, mesh, global_batch_size=16, bn_group_size=2, **NO_NORM)
    state = create_train_state(model, tx, rng=jax.random.key(0, impl="rbg"),
                               input_shape=(1,) + SHAPE, mesh=mesh)
    before = jax.device_get(state)
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])), "the case must keep the loss finite"
    assert not bool(m["finite"])
    after = jax.device_get(state)
    assert int(after.step) == 0
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)
    return m


def test_non_finite_gradient_with_a_finite_loss_keeps_the_input_state():
    m = _assert_step_refused(_SqrtAtZero(), goyal_sgd(0.1), batches(16, steps=1, seed=6)[0])
    assert not np.isfinite(float(m["grad_norm"]))


def test_overflowing_update_with_finite_gradients_keeps_the_input_state():
    # Finite loss and gradients, but the rate overflows float32, as with
    # --base-lr 1e38 --reference-batch-size 1 at kn = 16: 1e38 · 16 = inf.
    def overflowing(step):
        del step
        return jnp.float32(1e38) * jnp.float32(16)

    m = _assert_step_refused(tiny_model(2), goyal_sgd(overflowing),
                             batches(16, steps=1, seed=6)[0])
    assert np.isfinite(float(m["grad_norm"]))


def test_bfloat16_step_keeps_float32_state():
    tx = tiny_tx()
    data = batches(16, steps=1, seed=6)
    f32, m32 = run_engine(tiny_model(2), tx, jax.devices(), data)
    bf16, m16 = run_engine(tiny_model(2, jnp.bfloat16), tx, jax.devices(), data)
    for leaf in jax.tree.leaves((bf16.params, bf16.batch_stats, bf16.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    assert bool(m16[0]["finite"])
    # tolerance: bf16 activations through 5 conv layers; the loss is ~log(10).
    np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=2e-2)


def _reference_eval(model, state, images, labels):
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": state.params, "batch_stats": state.batch_stats}, images), np.float64)
    order = np.argsort(-logits, axis=1)
    top1 = np.sum(order[:, 0] != labels)
    top5 = np.sum([labels[i] not in order[i, :5] for i in range(len(labels))])
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return top1, top5, -logp[np.arange(len(labels)), labels].sum()


@pytest.mark.parametrize("num_examples, batch_size", [(21, 8), (13, 16), (8, 8)])
def test_masked_eval_counts_every_example_once(num_examples, batch_size):
    model, tx = tiny_model(2), tiny_tx()
    mesh = make_mesh()
    state = init_state(model, tx, mesh)
    state, _ = engine_step(model, tx, 8, 1, 16)(
        state, batches(16, steps=1, seed=7)[0])  # BN averages away from (0, 1)
    data = batches(num_examples, steps=1, seed=8)[0]
    eval_step = engine_eval_step(model)
    totals = {"top1_errors": 0, "top5_errors": 0, "loss_sum": 0.0, "count": 0}
    for start in range(0, num_examples, batch_size):
        image = data["image"][start:start + batch_size]
        label = data["label"][start:start + batch_size]
        pad = batch_size - len(label)
        batch = {  # padding: garbage images and labels, mask 0
            "image": np.concatenate([image, np.full((pad,) + SHAPE, 1e3, np.float32)]),
            "label": np.concatenate([label, np.full(pad, -1, np.int32)]),
            "mask": np.concatenate([np.ones(len(label), bool), np.zeros(pad, bool)]),
        }
        for key, value in jax.device_get(eval_step(state, host_to_global(batch, mesh))).items():
            totals[key] += value
    top1, top5, loss_sum = _reference_eval(model, state, data["image"], data["label"])
    assert totals["count"] == num_examples
    assert totals["top1_errors"] == top1 and totals["top5_errors"] == top5
    assert 0 < top5 < top1  # a non-trivial check
    # tolerance: float32 log-softmax against float64.
    np.testing.assert_allclose(totals["loss_sum"], loss_sum, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=100, num_devices=8, grad_accum_steps=1, bn_group_size=4),
         r"global_batch_size=100 does not split over 8 devices × grad_accum_steps=1; use a "
         r"multiple of 32"),
        (dict(global_batch_size=64, num_devices=8, grad_accum_steps=2, bn_group_size=8),
         r"bn_group_size=8 is larger than the microbatch of 4 images"),
        (dict(global_batch_size=96, num_devices=8, grad_accum_steps=1, bn_group_size=8),
         r"bn_group_size=8 does not divide the microbatch of 12 images"),
        (dict(global_batch_size=64, num_devices=8, grad_accum_steps=0, bn_group_size=8),
         r"grad_accum_steps must be a positive integer, got 0"),
        (dict(global_batch_size=64.0, num_devices=8, grad_accum_steps=1, bn_group_size=8),
         r"global_batch_size must be a positive integer, got 64.0"),
    ],
)
def test_bad_layout_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_batch_layout(**kwargs)


def test_layout_of_the_paper():
    layout = validate_batch_layout(global_batch_size=8192, num_devices=8, grad_accum_steps=4,
                                   bn_group_size=32)
    assert (layout.per_device, layout.microbatch, layout.num_bn_workers) == (1024, 256, 256)


def test_make_train_step_rejects_bad_configuration_before_compiling():
    model, tx, mesh = tiny_model(2), tiny_tx(), make_mesh()
    with pytest.raises(ValueError, match="bn_group_size=8 is larger than the microbatch of 2"):
        make_train_step(tiny_model(8), tx, mesh, global_batch_size=16, bn_group_size=8)
    with pytest.raises(ValueError, match="differs from the model's bn_group_size=2"):
        make_train_step(model, tx, mesh, global_batch_size=16, bn_group_size=4)
    with pytest.raises(ValueError, match="one value per channel"):
        make_train_step(model, tx, mesh, global_batch_size=16, bn_group_size=2,
                        pixel_mean=(0.0,))
    with pytest.raises(ValueError, match="differs from the model's bn_group_size=None"):
        make_train_step(model.clone(bn_group_size=None), tx, mesh, global_batch_size=16,
                        bn_group_size=2)
    step = make_train_step(model, tx, mesh, global_batch_size=16, bn_group_size=2, **NO_NORM)
    state = init_state(model, tx, mesh)
    with pytest.raises(ValueError, match="has 8 examples, but the step was built for "
                                         "global_batch_size=16"):
        step(state, batches(8, steps=1)[0])
    with pytest.raises(ValueError, match="lacks"):
        step(state, {"image": np.zeros((16,) + SHAPE, np.float32)})
    eval_step = make_eval_step(model, mesh, **NO_NORM)
    with pytest.raises(ValueError, match="cannot be split over 8 devices"):
        eval_step(state, {**batches(12, steps=1)[0], "mask": np.ones(12, np.float32)})
    assert compilations(step.jitted) == 0  # nothing was compiled


@pytest.mark.parametrize("name", ["ring", "halving_doubling", "binary_blocks", "hierarchical"])
def test_paper_allreduce_in_the_step_equals_psum(name):
    """The engine with section 4's all-reduces gives the parameters of XLA's psum."""
    from lsgd_jax.collectives import get_allreduce

    model, tx = tiny_model(2), tiny_tx()
    data = batches(16, steps=2, seed=3)
    ref, _ = run_engine(model, tx, jax.devices(), data)
    mesh = make_mesh()
    # Two fake "hosts" of 4 devices for the two-level variant.
    allreduce = get_allreduce(name, devices_per_host=4) if name == "hierarchical" else name
    step = make_train_step(model, tx, mesh, global_batch_size=16, bn_group_size=2,
                           allreduce=allreduce, **NO_NORM)
    state = init_state(model, tx, mesh)
    for batch in data:
        state, _ = step(state, host_to_global(batch, mesh))
    tree_allclose(state.params, ref.params, **TOL)
    tree_allclose(state.opt_state, ref.opt_state, **TOL)
    assert_replicated(state.params)


def test_smoothed_cross_entropy_by_hand():
    from lsgd_jax.engine.step import cross_entropy

    # logits (2, 0, −1), label 0, α = 0.3, 3 classes: targets (0.8, 0.1, 0.1), and
    # −Σ q·log p = Σ q·(lse − z) = lse − (0.8·2 + 0.1·0 − 0.1·1) = lse − 1.5.
    logits, labels = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([0])
    lse = np.log(np.exp(2.0) + 1.0 + np.exp(-1.0))
    # tolerance: float32 log-softmax of numbers of order 1
    np.testing.assert_allclose(cross_entropy(logits, labels, 0.3), [lse - 1.5], rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, labels), [lse - 2.0], rtol=1e-6)


def test_label_smoothing_keeps_the_kn_rule_of_the_step():
    """8 devices × n = 2 with α = 0.2 against one device: per worker, Σ smoothed CE / kn."""
    alpha, kn, n = 0.2, 16, 2
    model, tx = tiny_model(n), tiny_tx()
    whole = model.clone(bn_group_size=None)
    data = batches(kn, steps=2, seed=5)

    def worker_loss(params, batch_stats, x, y):
        logits, updates = whole.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        q = (1 - alpha) * jax.nn.one_hot(y, CLASSES) + alpha / CLASSES
        ce = -jnp.sum(q * jax.nn.log_softmax(logits), axis=-1)
        return ce.sum() / kn, (updates["batch_stats"], ce.sum())

    @jax.jit
    def reference(state, batch):
        x = batch["image"].reshape((kn // n, n) + SHAPE)
        y = batch["label"].reshape(kn // n, n)
        g, (stats, ce) = jax.vmap(jax.grad(worker_loss, has_aux=True),
                                  in_axes=(None, None, 0, 0))(state.params, state.batch_stats, x, y)
        updates, opt_state = tx.update(jax.tree.map(lambda t: t.sum(0), g), state.opt_state,
                                       state.params)
        return state.replace(step=state.step + 1,
                             params=optax.apply_updates(state.params, updates),
                             batch_stats=jax.tree.map(lambda t: t.mean(0), stats),
                             opt_state=opt_state), ce.sum() / kn

    mesh = make_mesh()
    step = make_train_step(model, tx, mesh, global_batch_size=kn, bn_group_size=n,
                           label_smoothing=alpha)
    state, ref = init_state(model, tx, mesh), init_state(model, tx, mesh_of(1))
    plain, _ = run_engine(model, tx, jax.devices(), data)
    for batch in data:
        state, metrics = step(state, host_to_global(batch, mesh))
        ref, ref_loss = reference(ref, batch)
        np.testing.assert_allclose(jax.device_get(metrics["loss"]), ref_loss, **TOL)
    tree_allclose(state.params, ref.params, **TOL)
    assert max_tree_diff(state.params, plain.params) > 1e-4  # the smoothing acted


def test_label_smoothing_out_of_range_is_refused_before_compiling():
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got 1.0"):
        make_train_step(tiny_model(2), tiny_tx(), make_mesh(), global_batch_size=16,
                        bn_group_size=2, label_smoothing=1.0)
