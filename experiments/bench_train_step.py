"""Throughput of the synchronous SGD train step on synthetic ImageNet-shaped data.

Runs lsgd_jax.engine.step.make_train_step (per-worker BN, loss / kn, gradient
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

Speed switches of the model (same results, lsgd_jax.models): --bn-impl, --bn-split-rows,
--pool-impl, --stem-impl; --xla-option NAME=VALUE passes an XLA option to this
compile only (e.g. xla_gpu_enable_fast_min_max=true). A/B in one process:
``--variant NAME=FLAGS`` (repeatable) builds one step per variant, the first being
the reference; FLAGS are any of those switches and --bn-group-size, added to the
command line's. All variants are timed in interleaved windows (a window of each in
turn, ``--repeats`` rounds), so drift hits them alike. ``--combine`` then adds the
reference with every lever of a variant that beat it (of two variants setting the same
switch, the faster one's value; XLA options are pooled) and times every variant again;
the second rounds' figures are the reported ones. ``--winner-args FILE`` writes the
flags of the fastest variant with the reference's BN groups; ``--profile-steps``
profiles that variant. A variant whose XLA option this jaxlib does not know is skipped
with a message; a bad option without --variant stops the script before compiling.
  python experiments/bench_train_step.py ... --variant 'today=' \\
      --variant 'bn_vjp=--bn-impl custom_vjp' --variant 'pool=--pool-impl masks' --combine
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import time

import jax
import jax.numpy as jnp

from lsgd_jax.bench.abtest import (
    VARIANT_KEYS,
    Built,
    Variant,
    combination,
    time_rounds,
    unknown_option,
    xla_options,
)
from lsgd_jax.bench.profiling import bf16_peak, op_kind, profile, step_flops
from lsgd_jax.engine.step import create_train_state, make_train_step
from lsgd_jax.models import get_model
from lsgd_jax.models.grouped_bn import BN_IMPLS, DEFAULT_SPLIT_ROWS
from lsgd_jax.models.pooling import POOL_IMPLS
from lsgd_jax.models.stem import STEM_IMPLS
from lsgd_jax.parallel.distributed import data_sharding, initialize_distributed, make_mesh
from lsgd_jax.rules.optim import goyal_sgd
from lsgd_jax.rules.schedules import scaled_learning_rate


def add_variant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bn-group-size", type=int, default=32)
    p.add_argument("--bn-impl", choices=BN_IMPLS, default="plain",
                   help="training-mode BN statistics: one reduction per group, two-stage "
                        "(split), or two-stage with a hand-written backward (custom_vjp)")
    p.add_argument("--bn-split-rows", type=int, default=DEFAULT_SPLIT_ROWS,
                   help="most rows of the first stage of split/custom_vjp BN reductions")
    p.add_argument("--pool-impl", choices=POOL_IMPLS, default="reduce_window",
                   help="max-pool backward: XLA's select-and-scatter, or elementwise masks")
    p.add_argument("--stem-impl", choices=STEM_IMPLS, default="conv",
                   help="stem convolution: as is, input padded to 4 channels, or space-to-depth")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="XLA option for this compile only (repeatable)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-per-device", type=int, default=256)
    add_variant_flags(p)
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
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="A/B mode: a named set of switches (repeatable; the first is the "
                        "reference)")
    p.add_argument("--combine", action="store_true",
                   help="A/B mode: also time the reference with every lever that beat it")
    p.add_argument("--winner-args", metavar="FILE",
                   help="A/B mode: write the fastest variant's flags (reference BN groups)")
    args = p.parse_args()
    for name in ("batch_per_device", "steps", "repeats", "grad_accum_steps", "image_size",
                 "channels", "bn_group_size", "bn_split_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "profile_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if (args.combine or args.winner_args) and not args.variant:
        p.error("--combine and --winner-args need at least one --variant")
    args.variants = [Variant(args.label, argparse.Namespace(
        **{k: getattr(args, k) for k in VARIANT_KEYS}))]
    if args.variant:
        args.variants = [parse_variant(spec, args) for spec in args.variant]
        names = [v.name for v in args.variants]
        if len(set(names)) != len(names):
            p.error(f"--variant names must be unique, got {names}")
    for v in args.variants:
        try:
            xla_options(v.settings.xla_option)
        except ValueError as e:
            p.error(str(e))
    return args


def parse_variant(spec: str, args: argparse.Namespace) -> Variant:
    """'NAME=FLAGS': the command line's switches with FLAGS applied on top."""
    name, sep, flags = spec.partition("=")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--variant must be NAME=FLAGS with a NAME of letters, digits, _ "
                         f"or -, got {spec!r}")
    sub = argparse.ArgumentParser(prog=f"--variant {name}", add_help=False)
    add_variant_flags(sub)
    sub.set_defaults(**{k: getattr(args, k) for k in VARIANT_KEYS})
    settings = sub.parse_args(shlex.split(flags))
    if settings.bn_group_size < 1 or settings.bn_split_rows < 1:
        sub.error("--bn-group-size and --bn-split-rows must be >= 1")
    return Variant(name, settings)


def build(args, variant: Variant, mesh, kn: int, batch) -> Built:
    s = variant.settings
    model = get_model(args.model, num_classes=args.num_classes, dtype=args.dtype,
                      bn_group_size=s.bn_group_size, bn_impl=s.bn_impl,
                      bn_split_rows=s.bn_split_rows, pool_impl=s.pool_impl,
                      stem_impl=s.stem_impl)
    tx = goyal_sgd(scaled_learning_rate(0.1, kn))
    train_step = make_train_step(model, tx, mesh, global_batch_size=kn,
                                 bn_group_size=s.bn_group_size, dtype=args.dtype,
                                 grad_accum_steps=args.grad_accum_steps,
                                 allreduce=args.allreduce,
                                 pixel_mean=(127.5,) * args.channels,
                                 pixel_std=(64.0,) * args.channels)
    hwc = (args.image_size, args.image_size, args.channels)
    state = create_train_state(model, tx, rng=jax.random.key(0), input_shape=(1,) + hwc,
                               mesh=mesh)
    t0 = time.perf_counter()
    lowered = train_step.jitted.lower(state, batch)
    compiled = lowered.compile(compiler_options=xla_options(s.xla_option) or None)
    return Built(variant, compiled, lowered, state, train_step.layout,
                 time.perf_counter() - t0)


def build_or_skip(args, variant: Variant, mesh, kn, batch, may_skip: bool) -> Built | None:
    """Build a variant; in an A/B, a variant after the reference that fails is reported
    and left out, so that one broken lever does not void the others' figures."""
    try:
        b = build(args, variant, mesh, kn, batch)
    except Exception as e:  # noqa: BLE001
        if not may_skip:
            raise
        print(f"FAILED variant {variant.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    if args.variant:
        print(f"compiled {variant.name:28s} {b.compile_s:6.1f} s   {variant.flags()}", flush=True)
    return b


def main() -> None:
    args = parse_args()
    ab = bool(args.variant)
    initialize_distributed()  # no-op unless SLURM / Open MPI start several processes
    variants = []
    for v in args.variants:
        reason = unknown_option(v.settings.xla_option)
        if reason and not ab:
            raise SystemExit(f"--xla-option {v.settings.xla_option}: {reason}")
        if reason:
            print(f"skipped variant {v.name}: {reason}")
        else:
            variants.append(v)
    if not variants:
        raise SystemExit("no variant left to time")
    mesh = make_mesh()
    num_devices = mesh.devices.size
    kn = args.batch_per_device * num_devices
    hwc = (args.image_size, args.image_size, args.channels)

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
    rounds = dict(warmup=args.warmup_steps, steps=args.steps, repeats=args.repeats)
    built = []
    for v in variants:
        b = build_or_skip(args, v, mesh, kn, batch, ab and bool(built))
        built += [b] if b else []
    built = time_rounds(built, batch, **rounds)
    if ab and args.combine:
        print_ab(built, kn, "screening rounds")
        combined = combination(built)
        same = next((b for b in built if combined and all(
            b.variant.key(k) == combined.key(k) for k in VARIANT_KEYS)), None)
        if combined is None:
            print("combined: no lever beat the reference")
        elif same is not None:
            print(f"combined: the winning levers are variant {same.variant.name!r}")
        else:
            b = build_or_skip(args, combined, mesh, kn, batch, True)
            built += [b] if b else []
        built = time_rounds(built, batch, **rounds)

    same_groups = [b for b in built
                   if b.variant.settings.bn_group_size == built[0].variant.settings.bn_group_size]
    winner = min(same_groups, key=lambda b: b.step_s)
    if args.winner_args and jax.process_index() == 0:
        with open(args.winner_args, "w") as f:
            f.write(winner.variant.flags() + "\n")
    ranked, busy, ranked_all = [], None, []
    if args.profile_steps:
        winner.state, ranked_all, busy = profile(winner.compiled, winner.state, batch,
                                                 args.profile_steps, 10**6)
        ranked = ranked_all[:args.top_ops]
    if jax.process_index() != 0:
        return
    if ab:
        print_ab(built, kn, "final rounds" if args.combine else "rounds")
        print(f"winner           {winner.variant.name} ({winner.variant.flags()})")
    for b in ([winner] if ab else built):
        report(args, b, kn, mesh, ranked, busy, ranked_all)
    if args.json:
        with open(args.json, "a") as f:
            for b in built:
                f.write(json.dumps(record(args, b, kn, mesh, ranked if b is winner else [],
                                          ab)) + "\n")


def print_ab(built: list[Built], kn: int, title: str) -> None:
    ref = built[0]
    print(f"A/B ({title}; median of {len(ref.windows)} interleaved windows; reference "
          f"{ref.variant.name}):")
    for b in built:
        spread = ", ".join(f"{1e3 * w:.1f}" for w in b.windows)
        print(f"  {b.variant.name:28s} {1e3 * b.step_s:8.2f} ms  {kn / b.step_s:10,.0f} img/s  "
              f"{ref.step_s / b.step_s:6.3f}x  ({spread} ms)")


def report(args, b: Built, kn, mesh, ranked, busy, ranked_all) -> None:
    num_devices = mesh.devices.size
    devices = mesh.devices.flat
    layout, step_s, windows, s = b.layout, b.step_s, b.windows, b.variant.settings
    print(f"devices          {num_devices} x {devices[0].device_kind} "
          f"({jax.process_count()} process(es)); jax {jax.__version__}, "
          f"python {platform.python_version()}")
    print(f"model            {args.model}, {args.dtype}, {args.image_size}x{args.image_size}"
          f"x{args.channels}, {args.num_classes} classes, input {args.input_dtype}")
    print(f"batch            kn={kn} ({args.batch_per_device}/device, "
          f"{args.grad_accum_steps} microbatch(es) of {layout.microbatch}, "
          f"BN groups of {s.bn_group_size}: {layout.num_bn_workers} workers), "
          f"allreduce={args.allreduce}")
    print(f"switches         bn {s.bn_impl} (split rows {s.bn_split_rows}), pool {s.pool_impl}, "
          f"stem {s.stem_impl}, xla options {s.xla_option or 'none'}")
    print(f"XLA_FLAGS        {os.environ.get('XLA_FLAGS', '') or '(unset)'}")
    print(f"compile          {b.compile_s:.1f} s")
    spread = ", ".join(f"{1e3 * w:.1f}" for w in windows)
    print(f"step time        {1e3 * step_s:.1f} ms (median of {len(windows)} windows of "
          f"{args.steps} steps after {args.warmup_steps} warm-up: {spread} ms)")
    print(f"images/s         {kn / step_s:,.0f} total, "
          f"{kn / step_s / num_devices:,.0f} per device")
    stats = getattr(devices[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        print(f"peak memory      {stats['peak_bytes_in_use'] / 2**30:.1f} GiB on device 0")
    print(f"final loss       {float(b.metrics['loss']):.4f}")
    peak = bf16_peak(devices[0].device_kind)
    flops = step_flops(b.lowered)
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


def record(args, b: Built, kn, mesh, ranked, ab: bool) -> dict:
    num_devices = mesh.devices.size
    device = mesh.devices.flat[0]
    s, step_s = b.variant.settings, b.step_s
    stats = getattr(device, "memory_stats", lambda: None)()
    flops = step_flops(b.lowered)
    peak = bf16_peak(device.device_kind)
    return dict(
        label=b.variant.name, system="lsgd-jax train step", device=device.device_kind,
        num_devices=num_devices, jax=jax.__version__, model=args.model, dtype=args.dtype,
        batch_per_device=args.batch_per_device, bn_group_size=s.bn_group_size,
        bn_impl=s.bn_impl, bn_split_rows=s.bn_split_rows, pool_impl=s.pool_impl,
        stem_impl=s.stem_impl, xla_options=s.xla_option, ab_interleaved=ab,
        grad_accum_steps=args.grad_accum_steps, input_dtype=args.input_dtype,
        xla_flags=os.environ.get("XLA_FLAGS", ""), compile_s=b.compile_s, step_s=step_s,
        window_step_s=b.windows,
        img_per_s=kn / step_s, img_per_s_per_device=kn / step_s / num_devices,
        flops_per_step=flops, tflops_per_s=flops / step_s / 1e12 if flops else None,
        bf16_peak_tflops=peak / 1e12 if peak else None,
        peak_memory_gib=(stats["peak_bytes_in_use"] / 2**30
                         if stats and "peak_bytes_in_use" in stats else None),
        top_ops=[dict(name=n, calls_per_step=c // max(args.profile_steps, 1),
                      ms_per_step=1e3 * t / args.profile_steps)
                 for n, c, t in ranked])


if __name__ == "__main__":
    main()
