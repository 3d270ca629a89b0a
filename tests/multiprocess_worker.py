"""One process of the multi-process equivalence test (run by tests/test_multiprocess.py).

Trains a tiny ResNet for a few steps on a fixed global batch sequence, each
process feeding only its own rows, then evaluates a padded batch. Process 0
writes the final parameters, BN averages, optimizer state and metrics to an
.npz file. Run with XLA_FLAGS=--xla_force_host_platform_device_count=D.
"""

import argparse

import jax
import numpy as np

GLOBAL_BATCH = 16
STEPS = 3
SHAPE = (8, 8, 3)
CLASSES = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from helpers import tiny_resnet

    from lsgd_jax.engine.step import create_train_state, make_eval_step, make_train_step
    from lsgd_jax.parallel.distributed import host_to_global, initialize_distributed, make_mesh
    from lsgd_jax.rules.optim import goyal_sgd

    if args.num_processes > 1:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                               cpu_collectives="gloo", initialization_timeout=120)
    assert jax.process_count() == args.num_processes
    mesh = make_mesh()
    model = tiny_resnet(2, num_classes=CLASSES)
    tx = goyal_sgd(0.1, weight_decay=5e-3)
    norm = dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
    state = create_train_state(model, tx, rng=jax.random.key(0, impl="rbg"),
                               input_shape=(1,) + SHAPE, mesh=mesh)
    train_step = make_train_step(model, tx, mesh, global_batch_size=GLOBAL_BATCH, bn_group_size=2,
                                 **norm)
    eval_step = make_eval_step(model, mesh, **norm)

    rows = GLOBAL_BATCH // args.num_processes
    mine = slice(args.process_id * rows, (args.process_id + 1) * rows)
    rng = np.random.default_rng(0)  # the same global sequence on every process
    losses = []
    for _ in range(STEPS):
        images = rng.normal(size=(GLOBAL_BATCH,) + SHAPE).astype(np.float32)
        images *= rng.uniform(0.5, 2.0, (GLOBAL_BATCH, 1, 1, 1)).astype(np.float32)
        labels = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
        batch = host_to_global({"image": images[mine], "label": labels[mine]}, mesh)
        state, metrics = train_step(state, batch)
        losses.append(metrics["loss"])

    # 13 real examples padded to 16: every process feeds its rows and masks.
    images = rng.normal(size=(GLOBAL_BATCH,) + SHAPE).astype(np.float32)
    labels = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    mask = (np.arange(GLOBAL_BATCH) < 13).astype(np.float32)
    ev = eval_step(state, host_to_global(
        {"image": images[mine], "label": labels[mine], "mask": mask[mine]}, mesh))

    def local(x):  # replicated: every device holds the whole value
        return np.asarray(x.addressable_data(0))

    out = {}
    for prefix, tree in (("params", state.params), ("batch_stats", state.batch_stats),
                         ("opt_state", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + jax.tree_util.keystr(path)] = local(leaf)
    out["step"] = local(state.step)
    out["loss"] = np.array([local(x) for x in losses])
    for key, value in ev.items():
        out["eval_" + key] = local(value)
    if args.process_id == 0:
        np.savez(args.out, **out)


if __name__ == "__main__":
    main()
