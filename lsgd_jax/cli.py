"""Command line of ``experiments/imagenet_resnet50.py``: flags -> TrainConfig -> train_and_evaluate.

Every flag defaults to the paper's ImageNet recipe (section 5.1). Launch flags
(processes, fake CPU devices) are handled here, before JAX starts its backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from lsgd_jax.collectives import ALLREDUCE_NAMES
from lsgd_jax.config import DATA_NAMES, DTYPES, MODEL_NAMES, MOMENTUM_FORMS, TrainConfig
from lsgd_jax.schedules import WARMUP_KINDS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _epochs_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 30,60,80, got {text!r}") from None
    return tuple(int(v) if v.is_integer() else v for v in values)


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(
        prog="imagenet_resnet50.py",
        description="Large-minibatch synchronous SGD (Goyal et al. 2017): train ResNet-50 on "
                    "ImageNet, or a small model on synthetic data or Fashion-MNIST, with the "
                    "paper's recipe. Rerunning with the same --workdir resumes from the latest "
                    "checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workdir", required=True, default=argparse.SUPPRESS,
                   help="checkpoints, metrics.jsonl, config.json, TensorBoard (required)")
    g.add_argument("--seed", type=int, default=d["seed"], help="initialization, shuffles, augmentation")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_NAMES, default=d["data"],
                   help="synthetic is deterministic in (seed, step) and needs no files")
    g.add_argument("--data-dir", default=None,
                   help="tfds data dir (imagenet) or folder of the IDX files (fashion_mnist)")
    g.add_argument("--tfds-name", default=d["tfds_name"],
                   help="tfds builder read by --data imagenet")
    g.add_argument("--image-size", type=int, default=None, help="input side; default: the data set's")
    g.add_argument("--num-workers", type=int, default=d["num_workers"], help="decoding threads per process")
    g.add_argument("--max-bad-fraction", type=float, default=d["max_bad_fraction"],
                   help="fail when more than this fraction of images cannot be decoded")
    g.add_argument("--color-jitter", type=float, default=d["color_jitter"],
                   help="ImageNet: brightness/contrast/saturation jitter strength "
                        "(fb.resnet.torch: 0.4; the paper names none)")
    g.add_argument("--lighting", type=float, default=d["lighting"],
                   help="ImageNet: PCA lighting noise std (fb.resnet.torch: 0.1)")
    g.add_argument("--synthetic-examples", type=int, default=d["synthetic_examples"],
                   help="size of the synthetic training set")
    g.add_argument("--synthetic-eval-examples", type=int, default=d["synthetic_eval_examples"],
                   help="size of the synthetic validation set")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default=argparse.SUPPRESS,
                   help="(default: resnet50, or resnet20 for --data fashion_mnist)")
    g.add_argument("--dtype", choices=DTYPES, default=d["dtype"],
                   help="compute dtype; parameters and optimizer state are float32")
    g.add_argument("--zero-gamma", type=_bool, default=d["zero_init_residual"],
                   help="γ=0 on the last BN of every residual block")
    g = p.add_argument_group("minibatch (kn = k workers × n images)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="the global minibatch kn")
    g.add_argument("--bn-group-size", type=int, default=d["bn_group_size"],
                   help="n: images per BatchNorm worker, independent of the per-device batch")
    g.add_argument("--grad-accum-steps", type=int, default=d["grad_accum_steps"],
                   help="microbatches per device per step (BN per microbatch)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="training length in epochs")
    g.add_argument("--num-steps", type=int, default=None, help="stop after this many steps in all")
    g.add_argument("--base-lr", type=float, default=d["base_lr"], help="η per --reference-batch-size")
    g.add_argument("--reference-batch-size", type=int, default=d["reference_batch_size"],
                   help="the minibatch --base-lr is for; the rate is base_lr * kn / this")
    g.add_argument("--warmup", choices=WARMUP_KINDS, default=d["warmup"],
                   help="gradual: from base_lr to the scaled rate by equal steps; constant: "
                        "base_lr, then a jump")
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                   help="warmup length (no warmup when kn <= the reference batch)")
    g.add_argument("--decay-epochs", type=_epochs_list, default=d["decay_epochs"],
                   help="comma-separated, e.g. 30,60,80")
    g.add_argument("--decay-factor", type=float, default=d["decay_factor"],
                   help="rate multiplier at each decay epoch")
    g = p.add_argument_group("optimizer")
    g.add_argument("--momentum", type=float, default=d["momentum"], help="m, in [0, 1)")
    g.add_argument("--nesterov", type=_bool, default=d["nesterov"],
                   help="Nesterov momentum (true/false)")
    g.add_argument("--momentum-form", choices=MOMENTUM_FORMS, default=d["momentum_form"],
                   help="eq9: buffer without the rate; eq10: buffer holds the rate")
    g.add_argument("--momentum-correction", type=_bool, default=d["momentum_correction"],
                   help="eq10 only: rescale the buffer when the rate changes")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="λ, not on BN γ/β")
    g.add_argument("--allreduce", choices=ALLREDUCE_NAMES, default=d["allreduce"],
                   help="psum (XLA's, the production choice) or one of the paper's section-4 "
                        "algorithms in lsgd_jax.collectives")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpoint-every-steps", type=int, default=d["checkpoint_every_steps"],
                   help="0: at the end of every epoch only")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"],
                   help="how many of the latest checkpoints to keep")
    g.add_argument("--keep-every-epochs", type=int, default=d["keep_every_epochs"],
                   help="also keep one checkpoint every this many epochs (0: none)")
    g.add_argument("--eval-every-epochs", type=int, default=d["eval_every_epochs"],
                   help="full validation cadence; the last step is always evaluated")
    g.add_argument("--median-evals", type=int, default=d["median_evals"],
                   help="the result is the median top-1 error of this many evaluations, one "
                        "every 90th of the run at its end (the paper: the last 5 of 90 epochs)")
    g.add_argument("--log-every-steps", type=int, default=d["log_every_steps"],
                   help="console, metrics.jsonl and TensorBoard cadence")
    g = p.add_argument_group("processes (multi-host)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0; not needed under SLURM or Open MPI")
    g.add_argument("--num-processes", type=int, default=None,
                   help="total number of processes (with --coordinator-address)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process, 0 .. num_processes-1")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process is declared dead and the "
                        "others stop (jax.distributed)")
    g.add_argument("--shutdown-timeout", type=int, default=300,
                   help="seconds to wait for every process at exit (jax.distributed)")
    g.add_argument("--cpu-devices", type=int, default=None,
                   help="run on N fake CPU devices per process (testing without GPUs)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data, data_dir=args.data_dir, tfds_name=args.tfds_name, model=getattr(args, "model", None), image_size=args.image_size,
        batch_size=args.batch_size, bn_group_size=args.bn_group_size,
        grad_accum_steps=args.grad_accum_steps, epochs=args.epochs, num_steps=args.num_steps,
        base_lr=args.base_lr, reference_batch_size=args.reference_batch_size, warmup=args.warmup,
        warmup_epochs=args.warmup_epochs, decay_epochs=args.decay_epochs,
        decay_factor=args.decay_factor, momentum=args.momentum, nesterov=args.nesterov,
        momentum_form=args.momentum_form, momentum_correction=args.momentum_correction,
        weight_decay=args.weight_decay, zero_init_residual=args.zero_gamma, dtype=args.dtype,
        allreduce=args.allreduce, seed=args.seed,
        checkpoint_every_steps=args.checkpoint_every_steps,
        keep_checkpoints=args.keep_checkpoints, keep_every_epochs=args.keep_every_epochs,
        eval_every_epochs=args.eval_every_epochs, median_evals=args.median_evals,
        eval_batch_size=args.eval_batch_size,
        log_every_steps=args.log_every_steps, num_workers=args.num_workers,
        max_bad_fraction=args.max_bad_fraction, color_jitter=args.color_jitter,
        lighting=args.lighting, synthetic_examples=args.synthetic_examples,
        synthetic_eval_examples=args.synthetic_eval_examples)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Validate the configuration before any process starts talking to the others.
        config = config_from_args(args)
        for flag in ("cpu_devices", "heartbeat_timeout", "shutdown_timeout"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, "
                                 f"got {value}")
    except ValueError as e:
        # One line, like every other error of the run (the usage is in --help).
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.cpu_devices is not None:
        # Read when JAX starts its backends, which has not happened yet.
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")

    from lsgd_jax.parallel import initialize_distributed
    from lsgd_jax.train import main_guard, train_and_evaluate

    def run():
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                               heartbeat_timeout=args.heartbeat_timeout,
                               shutdown_timeout=args.shutdown_timeout)
        train_and_evaluate(config, args.workdir)

    return main_guard(run, workdir=args.workdir)


if __name__ == "__main__":
    sys.exit(main())
