"""Throughput of the synchronous SGD train step on synthetic ImageNet-shaped data.

Runs lsgd_jax.step.make_train_step (per-worker BN, loss / kn, gradient
all-reduce, goyal_sgd) on every visible device with a device-resident
synthetic uint8 batch, so the figure is the step alone (no input pipeline).
Prints compile time, step time, images/s in total and per device, and the
XLA flags in effect. No TensorFlow is needed. ``--json FILE`` appends the
figures as one JSON line; ``--profile-steps N`` traces N more steps with
jax.profiler and prints the most expensive XLA ops, the step's FLOPs from
``cost_analysis()`` and the achieved TFLOP/s against the card's bf16 peak.

GPU (the paper's setting, 256 images per device in BN groups of 32):
  . launch/xla_gpu_flags.sh
  python experiments/bench_train_step.py --model resnet50 --batch-per-device 256 \\
      --bn-group-size 32 --dtype bfloat16 --steps 50 --warmup-steps 10
CPU smoke run:
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_train_step.py \\
      --model resnet20 --image-size 32 --batch-per-device 8 --bn-group-size 4 \\
      --dtype float32 --steps 3 --warmup-steps 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from lsgd_jax.models import get_model
from lsgd_jax.optim import goyal_sgd
from lsgd_jax.profiling import bf16_peak, op_kind, profile, step_flops
from lsgd_jax.parallel import InFlight, data_sharding, initialize_distributed, make_mesh
from lsgd_jax.schedules import scaled_learning_rate
from lsgd_jax.step import create_train_state, make_train_step

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-per-device", type=int, default=256)
    p.add_argument("--bn-group-size", type=int, default=32)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps after compiling")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of --steps steps; the median window is reported")
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--allreduce", default="psum")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8 is normalized on device, as the input pipeline delivers it")
    p.add_argument("--json", metavar="FILE", help="append the figures as one JSON line")
    p.add_argument("--label", default="", help="a name for this variant in the JSON line")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="trace this many more steps and print the top XLA ops (0: no trace)")
    p.add_argument("--top-ops", type=int, default=15, help="how many ops the profile prints")
    args = p.parse_args()
    for name in ("batch_per_device", "steps", "repeats", "grad_accum_steps", "image_size", "channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "profile_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args()
    initialize_distributed()  # no-op unless SLURM / Open MPI start several processes
    mesh = make_mesh()
    num_devices = mesh.devices.size
    kn = args.batch_per_device * num_devices
    model = get_model(args.model, num_classes=args.num_classes, dtype=args.dtype,
                      bn_group_size=args.bn_group_size)
    tx = goyal_sgd(scaled_learning_rate(0.1, kn))
    train_step = make_train_step(model, tx, mesh, global_batch_size=kn,
                                 bn_group_size=args.bn_group_size, dtype=args.dtype,
                                 grad_accum_steps=args.grad_accum_steps,
                                 allreduce=args.allreduce,
                                 pixel_mean=(127.5,) * args.channels,
                                 pixel_std=(64.0,) * args.channels)
    hwc = (args.image_size, args.image_size, args.channels)
    state = create_train_state(model, tx, rng=jax.random.key(0), input_shape=(1,) + hwc,
                               mesh=mesh)

    # Synthetic batch made on the devices, already sharded like a real one.
    def synthetic(key):
        if args.input_dtype == "uint8":
            image = jax.random.randint(key, (kn,) + hwc, 0, 256, jnp.int32).astype(jnp.uint8)
        else:
            image = jax.random.normal(key, (kn,) + hwc, jnp.float32)
        label = jax.random.randint(jax.random.fold_in(key, 1), (kn,), 0, args.num_classes,
                                   jnp.int32)
        return {"image": image, "label": label}

    batch = jax.jit(synthetic, out_shardings=data_sharding(mesh))(jax.random.key(1))

    t0 = time.perf_counter()
    lowered = train_step.jitted.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    # Step t runs while the host waits for step t-1 (InFlight): an unbounded queue of
    # all-reduce programs aborts on CPU devices, and on a GPU one step ahead keeps it busy.
    inflight = InFlight(depth=2)
    for _ in range(args.warmup_steps):
        state, metrics = compiled(state, batch)
        inflight.push(metrics)
    inflight.drain()
    jax.block_until_ready(state)
    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            inflight.push(metrics)
        inflight.drain()
        jax.block_until_ready(state)
        windows.append((time.perf_counter() - t0) / args.steps)
    if not bool(metrics["finite"]):
        raise RuntimeError("the benchmark step produced non-finite values")

    step_s = sorted(windows)[len(windows) // 2]  # the median window
    flops = step_flops(lowered)
    ranked, busy = [], None
    if args.profile_steps:
        state, ranked_all, busy = profile(compiled, state, batch, args.profile_steps, 10**6)
        ranked = ranked_all[:args.top_ops]
    layout = train_step.layout
    devices = mesh.devices.flat
    if jax.process_index() == 0:
        print(f"devices          {num_devices} x {devices[0].device_kind} "
              f"({jax.process_count()} process(es)); jax {jax.__version__}, "
              f"python {platform.python_version()}")
        print(f"model            {args.model}, {args.dtype}, {args.image_size}x{args.image_size}"
              f"x{args.channels}, {args.num_classes} classes, input {args.input_dtype}")
        print(f"batch            kn={kn} ({args.batch_per_device}/device, "
              f"{args.grad_accum_steps} microbatch(es) of {layout.microbatch}, "
              f"BN groups of {args.bn_group_size}: {layout.num_bn_workers} workers), "
              f"allreduce={args.allreduce}")
        print(f"XLA_FLAGS        {os.environ.get('XLA_FLAGS', '') or '(unset)'}")
        print(f"compile          {compile_s:.1f} s")
        spread = ", ".join(f"{1e3 * w:.1f}" for w in windows)
        print(f"step time        {1e3 * step_s:.1f} ms (median of {args.repeats} windows of "
              f"{args.steps} steps after {args.warmup_steps} warm-up: {spread} ms)")
        print(f"images/s         {kn / step_s:,.0f} total, "
              f"{kn / step_s / num_devices:,.0f} per device")
        stats = getattr(devices[0], "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:
            print(f"peak memory      {stats['peak_bytes_in_use'] / 2**30:.1f} GiB on device 0")
        print(f"final loss       {float(metrics['loss']):.4f}")
        peak = bf16_peak(devices[0].device_kind)
        if flops:
            achieved = flops / step_s
            versus = (f", {100 * achieved / peak:.1f} % of the {peak / 1e12:.0f} TFLOP/s bf16 "
                      "peak" if peak else "")
            print(f"flops            {flops / 1e9:,.1f} GFLOP per step (cost_analysis, "
                  f"all devices of this process): {achieved / 1e12:.1f} TFLOP/s{versus}")
        if ranked:
            print(f"profile          {args.profile_steps} steps, {busy:.3f} s of op time; "
                  f"top {len(ranked)} ops by total time:")
            kinds = collections.Counter()
            for name, _, seconds in ranked_all:
                kinds[op_kind(name)] += seconds
            print("  by kind (all ops): " + ", ".join(
                f"{k} {1e3 * t / args.profile_steps:.2f} ms/step ({100 * t / busy:.0f} %)"
                for k, t in kinds.most_common()))
            for name, n_calls, seconds in ranked:
                print(f"  {100 * seconds / busy:5.1f} %  {1e3 * seconds / args.profile_steps:8.3f} "
                      f"ms/step  {n_calls // args.profile_steps:4d}x  {name[:100]}")
        if args.json:
            record = dict(
                label=args.label, system="lsgd-jax train step", device=devices[0].device_kind,
                num_devices=num_devices, jax=jax.__version__, model=args.model, dtype=args.dtype,
                batch_per_device=args.batch_per_device, bn_group_size=args.bn_group_size,
                grad_accum_steps=args.grad_accum_steps, input_dtype=args.input_dtype,
                xla_flags=os.environ.get("XLA_FLAGS", ""), compile_s=compile_s, step_s=step_s,
                window_step_s=windows,
                img_per_s=kn / step_s, img_per_s_per_device=kn / step_s / num_devices,
                flops_per_step=flops, tflops_per_s=flops / step_s / 1e12 if flops else None,
                bf16_peak_tflops=peak / 1e12 if peak else None,
                peak_memory_gib=(stats["peak_bytes_in_use"] / 2**30
                                 if stats and "peak_bytes_in_use" in stats else None),
                top_ops=[dict(name=n, calls_per_step=c // max(args.profile_steps, 1),
                              ms_per_step=1e3 * t / args.profile_steps)
                         for n, c, t in ranked])
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
