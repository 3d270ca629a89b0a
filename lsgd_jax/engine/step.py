"""The synchronous SGD step of Goyal et al. 2017 on a ``("data",)`` mesh, and the eval step.

Per worker w of n images (n = ``bn_group_size``), with kn images in all:

* BatchNorm statistics over the worker's n images only (section 3,
  "BatchNorm"); a device holding b images runs b / n workers.
* The worker's loss is its summed cross-entropy divided by kn, not n
  (Remark 3), so that summing the gradients over all workers (the all-reduce)
  gives the gradient of the mean loss over kn; L2 weight decay, momentum and
  the learning rate come from the optimizer (``lsgd_jax.rules.optim.goyal_sgd``),
  applied once to the summed gradient.
* Gradient accumulation: each device runs K microbatches in turn (a
  ``lax.scan``), each with its own BN groups, and adds their gradients before
  the all-reduce: the math of K × devices workers (footnote 5 of the paper).
* Label smoothing (not the paper's; the later large-batch recipes'): with α > 0
  the cross-entropy is against (1 − α)·onehot + α/C over C classes; the sum is
  still divided by kn.

Running BN averages (this project's choice, not the paper's): every worker
(device × microbatch × group) updates the same starting averages with its own
statistics, and the result is averaged over workers. The paper only says
"running average (momentum 0.9)"; in its Caffe2 setting each worker kept its
own averages. Averaging them keeps one state, identical on every device, so a
checkpoint and an evaluation do not depend on which worker they are read
from, and no per-worker copies are stored. The update is linear, so this
equals ``avg ← 0.9·avg + 0.1·mean over all kn/n workers of their statistics``.
The training math (gradients, the per-worker normalization) is unaffected:
running averages are used in evaluation only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import lsgd_jax.base.checks as checks
from lsgd_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lsgd_jax.engine.layout import (
    BatchLayout,
    check_batch,
    check_pixel_stats,
    validate_batch_layout,
)
from lsgd_jax.parallel.distributed import (
    DATA_AXIS,
    data_sharding,
    replicated_sharding,
    shard_map,
)

__all__ = [
    "TrainState",
    "TrainStep",
    "apply_update",
    "create_train_state",
    "cross_entropy",
    "device_grads",
    "make_eval_step",
    "make_train_step",
    "microbatch_grads",
]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; replicated over the mesh.

    Attributes:
      step: number of applied steps (int32 scalar).
      params: model parameters (float32).
      batch_stats: BN running averages, already averaged over workers.
      opt_state: optimizer state (float32).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    input_shape: Sequence[int],
    mesh: Mesh,
) -> TrainState:
    """Initialize parameters, BN averages and optimizer state, replicated over ``mesh``.

    Every process must pass the same ``rng``. ``input_shape`` is any NHWC
    shape of the model's input, e.g. (1, 224, 224, 3).
    """

    def init(rng):
        variables = model.init(rng, jnp.zeros(tuple(input_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    return jax.jit(init, out_shardings=replicated_sharding(mesh))(rng)


def _normalize(images: jax.Array, pixel_mean, pixel_std, dtype: Any) -> jax.Array:
    """uint8 pixels → (x − mean) / std in ``dtype``; floating input is used as-is."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.shape[-1] != len(pixel_mean) or len(pixel_std) != len(pixel_mean):
        # Broadcasting would silently turn 1-channel images into 3 channels.
        raise ValueError(
            f"images have {images.shape[-1]} channels but pixel_mean/pixel_std have "
            f"{len(pixel_mean)}/{len(pixel_std)} values; pass one mean and std per channel")
    shape = (1,) * (images.ndim - 1) + (len(pixel_mean),)
    mean = jnp.asarray(pixel_mean, jnp.float32).reshape(shape)
    inv_std = 1.0 / jnp.asarray(pixel_std, jnp.float32).reshape(shape)
    # One multiply-add per pixel, fused with the cast.
    return (images.astype(jnp.float32) * inv_std + (-mean * inv_std)).astype(dtype)


def _all_finite(tree: Any) -> jax.Array:
    """True when every floating-point element of ``tree`` is finite."""
    finite = jnp.bool_(True)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(x))
    return finite


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _resolve_allreduce(allreduce: str | Callable) -> Callable:
    """``fn(tree, axis_name) -> summed tree`` for use inside shard_map."""
    if callable(allreduce):
        return allreduce
    if allreduce == "psum":
        return lambda tree, axis_name: jax.lax.psum(tree, axis_name)
    if not isinstance(allreduce, str):
        raise ValueError(
            "allreduce must be 'psum', the name of an lsgd_jax.collectives algorithm or a "
            f"function, got {allreduce!r}"
        )
    # The paper's algorithms (section 4) are for study; import them only on request.
    from lsgd_jax.collectives import get_allreduce

    return get_allreduce(allreduce)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example cross-entropy against integer labels, smoothed to
    (1 − α)·onehot + α/C when ``label_smoothing`` α > 0."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def microbatch_grads(model: Any, params, batch_stats, images, labels, kn: float,
                     label_smoothing: float = 0.0):
    """Gradient of (summed cross-entropy / kn) for one microbatch on one device (Remark 3).

    Returns ``grads, (new_batch_stats, ce_sum, errors)``; BN statistics per group of
    the model's n images, the averages updated from this microbatch's groups. The
    cross-entropy is against smoothed labels when ``label_smoothing`` > 0.
    """

    def loss_fn(p):
        logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        logits = logits.astype(jnp.float32)
        ce_sum = jnp.sum(cross_entropy(logits, labels, label_smoothing))
        errors = jnp.sum(jnp.argmax(logits, axis=-1) != labels).astype(jnp.float32)
        return ce_sum / kn, (updates["batch_stats"], ce_sum, errors)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, aux


def device_grads(model: Any, params, batch_stats, images, labels, *, layout: BatchLayout,
                 reduce_fn: Callable, label_smoothing: float = 0.0):
    """One device's share of a step, inside ``shard_map``: K microbatches in turn (a scan,
    footnote 5), their gradients added, then summed over devices (the all-reduce).

    Returns the summed gradient, the BN averages mixed over every worker, and the summed
    cross-entropy and error count over kn.
    """
    kn, K = float(layout.global_batch_size), layout.grad_accum_steps
    if K == 1:
        grads, (new_stats, ce_sum, errors) = microbatch_grads(
            model, params, batch_stats, images, labels, kn, label_smoothing)
    else:
        xs = (images.reshape((K, layout.microbatch) + images.shape[1:]),
              labels.reshape((K, layout.microbatch)))

        def body(carry, x):
            g, (s, ce, err) = microbatch_grads(model, params, batch_stats, *x, kn,
                                               label_smoothing)
            return jax.tree.map(jnp.add, carry, (g, s, ce, err)), None

        zero = jnp.zeros([], jnp.float32)
        zeros = jax.tree.map(jnp.zeros_like, (params, batch_stats, zero, zero))
        (grads, stat_sum, ce_sum, errors), _ = jax.lax.scan(body, zeros, xs)
        new_stats = jax.tree.map(lambda s: s / K, stat_sum)
    grads = reduce_fn(grads, DATA_AXIS)
    # Each device's averages already mix its microbatches; mixing devices completes the
    # average over all workers and keeps them replicated.
    new_stats = jax.lax.pmean(new_stats, DATA_AXIS)
    ce_sum, errors = jax.lax.psum((ce_sum, errors), DATA_AXIS)
    return grads, new_stats, ce_sum, errors


def apply_update(tx: optax.GradientTransformation, state: TrainState, grads, batch_stats,
                 ce_sum, errors, kn: float) -> tuple[TrainState, dict]:
    """The optimizer update from the summed gradient, guarded: a step whose loss, gradient
    or updated state is not finite returns ``state`` unchanged (``metrics["finite"]``)."""
    loss = ce_sum / kn
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    # The loss, every gradient and every updated array (parameters, BN averages,
    # momentum): a finite gradient times an overflowing rate is caught too.
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_state)
    # Select, so a non-finite step can never reach the state (or a checkpoint).
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "top1_error": errors / kn, "grad_norm": _global_norm(grads),
               "finite": finite}
    return state, metrics


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The built step: call it as ``step(state, batch)``; ``jitted`` is the compiled
    program without the batch check (for ``.lower()``), ``layout`` the checked layout."""

    fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    jitted: Any
    layout: BatchLayout

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.fn(state, batch)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    global_batch_size: int,
    bn_group_size: int,
    grad_accum_steps: int = 1,
    allreduce: str | Callable = "psum",
    dtype: Any = jnp.float32,
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
    label_smoothing: float = 0.0,
) -> TrainStep:
    """Build the jitted synchronous SGD step (the module docstring states its math).

    Args:
      model: a flax module with ``__call__(x, train)``, built with the same
        ``bn_group_size`` (e.g. by :func:`lsgd_jax.models.get_model`).
      tx: the optimizer, e.g. ``goyal_sgd(schedule)``; it sees the summed
        gradient of the mean loss over kn and adds the weight decay itself.
      mesh: a ``("data",)`` mesh (:func:`lsgd_jax.parallel.distributed.make_mesh`).
      global_batch_size: kn, images per step over all devices and microbatches.
      bn_group_size: the paper's n, images per BN worker; the model's must be the same.
      grad_accum_steps: K microbatches per device per step.
      allreduce: "psum" (XLA's all-reduce), the name of an algorithm of
        ``lsgd_jax.collectives``, or ``fn(tree, axis_name)``.
      dtype: the compute dtype uint8 images are normalised to (the model's).
      pixel_mean, pixel_std: per-channel statistics (0-255 units) used when
        ``batch["image"]`` is uint8; floating images are used as given.
      label_smoothing: α in [0, 1); the loss is the cross-entropy against
        (1 − α)·onehot + α/C (0: the paper's plain cross-entropy).

    Returns:
      A :class:`TrainStep`; ``step(state, batch) -> (state, metrics)``. ``batch``
      holds "image" [kn, H, W, C] (uint8 or float) and "label" [kn] int32, sharded
      over "data"; ``state`` is donated. ``metrics`` are device arrays, not synced:
      "loss" (mean cross-entropy over kn, smoothed when α > 0, without L2), "top1_error" (fraction of the
      batch), "grad_norm" (global norm of the summed loss gradient, without L2) and
      "finite". When not finite the input state is returned unchanged.

    Raises:
      ValueError: for a bad layout or arguments, before compiling.
    """
    model_group = getattr(model, "bn_group_size", bn_group_size)
    if model_group != bn_group_size:
        raise ValueError(
            f"bn_group_size={bn_group_size} differs from the model's bn_group_size="
            f"{model_group}; build the model with the same value")
    layout = validate_batch_layout(
        global_batch_size=global_batch_size, num_devices=mesh.devices.size,
        grad_accum_steps=grad_accum_steps, bn_group_size=bn_group_size)
    check_pixel_stats(pixel_mean, pixel_std)
    checks.real("label_smoothing", label_smoothing, low=0, high=1, open_high=True)
    reduce_fn = _resolve_allreduce(allreduce)
    kn = float(layout.global_batch_size)

    def per_device(params, batch_stats, images, labels):
        images = _normalize(images, pixel_mean, pixel_std, dtype)
        return device_grads(model, params, batch_stats, images, labels, layout=layout,
                            reduce_fn=reduce_fn, label_smoothing=float(label_smoothing))

    sharded = shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
                        out_specs=(P(), P(), P(), P()))

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grads, batch_stats, ce_sum, errors = sharded(
            state.params, state.batch_stats, batch["image"], batch["label"])
        return apply_update(tx, state, grads, batch_stats, ce_sum, errors, kn)

    replicated = replicated_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(replicated, data_sharding(mesh)),
                     out_shardings=(replicated, replicated), donate_argnums=0)

    def checked(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        check_batch(batch, ("image", "label"), mesh.devices.size, layout.global_batch_size,
                    "train_step")
        return jitted(state, {"image": batch["image"], "label": batch["label"]})

    return TrainStep(fn=checked, jitted=jitted, layout=layout)


def make_eval_step(
    model: Any,
    mesh: Mesh,
    *,
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
) -> Callable[[TrainState, dict], dict]:
    """Build the jitted evaluation step: masked sums over the global batch.

    BN uses the running averages, so examples are independent and padding
    changes nothing for the real ones. Summing the returned values over the
    batches of a padded, masked validation set scores every example exactly
    once, whatever the number of devices.

    Args:
      model: the flax module used for training.
      mesh: the ``("data",)`` mesh.
      pixel_mean, pixel_std: as in :func:`make_train_step`.

    Returns:
      ``eval_step(state, batch) -> metrics``; ``batch`` holds "image", "label"
      and "mask" (float or bool [N]; 0 for padding), N a multiple of the
      device count. ``metrics``: "top1_errors", "top5_errors", "count"
      (int32) and "loss_sum" (float32), sums over the real examples. A label
      counts as within the top k when fewer than k classes score strictly
      higher (ties go to the label).
    """
    check_pixel_stats(pixel_mean, pixel_std)
    num_devices = mesh.devices.size
    dtype = getattr(model, "dtype", jnp.float32)

    def step(state: TrainState, batch: dict) -> dict:
        images = _normalize(batch["image"], pixel_mean, pixel_std, dtype)
        labels = batch["label"]
        valid = batch["mask"].astype(jnp.bool_)  # any non-zero mask marks a real example
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
        ).astype(jnp.float32)
        safe_labels = jnp.where(valid, labels, 0)
        true_logit = jnp.take_along_axis(logits, safe_labels[:, None], axis=1)
        rank = jnp.sum(logits > true_logit, axis=1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
        return {
            "top1_errors": jnp.sum(valid & (rank >= 1)).astype(jnp.int32),
            "top5_errors": jnp.sum(valid & (rank >= 5)).astype(jnp.int32),
            "loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)),
            "count": jnp.sum(valid).astype(jnp.int32),
        }

    jitted = jax.jit(
        step,
        in_shardings=(replicated_sharding(mesh), data_sharding(mesh)),
        out_shardings=replicated_sharding(mesh),
    )

    @functools.wraps(step)
    def eval_step(state: TrainState, batch: dict) -> dict:
        check_batch(batch, ("image", "label", "mask"), num_devices, None, "eval_step")
        return jitted(state, {k: batch[k] for k in ("image", "label", "mask")})

    eval_step.jitted = jitted  # type: ignore[attr-defined]  # for the benchmarks
    return eval_step
