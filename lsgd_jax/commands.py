"""The ``lsgd-jax`` command: ``train``, ``evaluate``, ``export`` and ``predict``.

``lsgd-jax train`` takes the flags of ``experiments/imagenet_resnet50.py``
(:mod:`lsgd_jax.cli`); the others take those of ``experiments/evaluate.py``,
``export.py`` and ``predict.py``, which call the functions here. ``python -m
lsgd_jax`` is the same command. Bad input (a flag, a workdir without checkpoints, a
damaged checkpoint or model file) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from lsgd_jax.cli import main_guard


def _parser(prog: str, description: str, *, launch: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    if launch:
        g = p.add_argument_group("processes (multi-host, as for training)")
        g.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0; not needed under SLURM or Open MPI")
        g.add_argument("--num-processes", type=int, default=None, help="total processes")
        g.add_argument("--process-id", type=int, default=None, help="this process")
        g.add_argument("--initialization-timeout", type=int, default=300,
                       help="seconds to wait for the coordinator and every process")
        g.add_argument("--cpu-devices", type=int, default=None,
                       help="run on N fake CPU devices per process (testing without GPUs)")
    return p


def _workdir_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="the training run's --workdir (read only)")
    p.add_argument("--step", type=int, default=None,
                   help="the checkpoint to read (default: the newest that verifies)")


def _start(args, positive: dict[str, int | None]) -> str:
    """Checks flags that must be positive, then sets up fake CPU devices; returns an
    error line or "". The processes start in :func:`_launched`."""
    for flag, value in positive.items():
        if value is not None and value < 1:
            return f"{flag} must be a positive integer, got {value}"
    if getattr(args, "cpu_devices", None) is not None:
        from lsgd_jax.parallel import use_cpu_devices

        use_cpu_devices(args.cpu_devices)  # before JAX starts its backends
    return ""


def _launched(args, fn: Callable[[], None]) -> int:
    """Start the processes (multi-host), then ``fn``, both under ``main_guard``, as
    training does: a launch that fails is one line and exit status 2 too."""
    def run():
        import os

        from lsgd_jax.parallel import initialize_distributed
        from lsgd_jax.quiet import divert_library_noise

        # A reader writes nothing into the workdir: orbax's and asyncio's tracebacks of a
        # damaged checkpoint are dropped; the command's own line says what happened.
        divert_library_noise(os.devnull)
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                               initialization_timeout=args.initialization_timeout)
        fn()

    return main_guard(run)


def _fail(line: str) -> int:
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 2


def _log(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------ evaluate
def evaluate_parser() -> argparse.ArgumentParser:
    p = _parser("lsgd-jax evaluate", "Evaluate a training run's checkpoint on the whole "
                "validation split (top-1 and top-5 error, exact: every image once, on any "
                "number of devices). Reads the workdir without changing it or taking its lock; "
                "appends an `eval` record with source \"evaluate\" to its metrics.jsonl.")
    _workdir_flags(p)
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="global batch of the pass (default: the run's)")
    p.add_argument("--data-dir", default=None, help="where the data lies on this host "
                   "(default: the run's --data-dir)")
    p.add_argument("--no-record", action="store_true",
                   help="do not append the result to WORKDIR/metrics.jsonl")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    error = _start(args, {"--eval-batch-size": args.eval_batch_size,
                          "--cpu-devices": args.cpu_devices})
    if error:
        return _fail(error)

    def run():
        import jax

        from lsgd_jax.metrics import MetricsWriter
        from lsgd_jax.readback import evaluate_run, restore_run

        restored = restore_run(args.workdir, step=args.step, log=_log)
        _log(f"evaluating {restored.workdir}/checkpoints/{restored.step} (state SHA-256 "
             f"verified) on {restored.mesh.devices.size} devices")
        result = evaluate_run(restored, eval_batch_size=args.eval_batch_size,
                              data_dir=args.data_dir)
        spe = restored.steps_per_epoch
        _log(f"step {restored.step}: top-1 error {100 * result['top1_error']:.2f}%, top-5 "
             f"error {100 * result['top5_error']:.2f}% over {result['count']} images "
             f"(loss {result['loss']:.4f})")
        if not args.no_record and jax.process_index() == 0:
            extra = {"epoch": restored.step / spe} if spe else {}
            try:
                MetricsWriter(restored.workdir, tensorboard=False).write(
                    "eval", restored.step, source="evaluate", **extra, **result,
                    num_devices=restored.mesh.devices.size, num_processes=jax.process_count())
            except OSError as e:
                print(f"warning: could not append to {restored.workdir}/metrics.jsonl "
                      f"({e.strerror}); the result is above", file=sys.stderr)

    return _launched(args, run)


# ------------------------------------------------------------------ export
def export_parser() -> argparse.ArgumentParser:
    p = _parser("lsgd-jax export", "Write a training run's parameters and BN averages to "
                "one file (Flax msgpack) and a JSON description beside it (MODEL.json), for "
                "lsgd_jax.load_model, `lsgd-jax predict` and --init-from.")
    _workdir_flags(p)
    p.add_argument("--out", required=True, help="the model file, e.g. model.msgpack")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return _fail(f"--out {args.out}: the folder {out_dir} does not exist; create it or "
                     "choose another path")
    error = _start(args, {"--cpu-devices": args.cpu_devices})
    if error:
        return _fail(error)

    def run():
        from lsgd_jax.model_file import export_model, sidecar_path
        from lsgd_jax.readback import restore_run

        restored = restore_run(args.workdir, step=args.step, log=_log)
        meta = export_model(restored, args.out)
        result = meta["result"] or {}
        figure = result.get("median_top1_error")
        _log(f"wrote {args.out} and {sidecar_path(args.out)}: {meta['model']}, "
             f"{meta['num_classes']} classes, step {meta['step']} of {restored.workdir}"
             + (f", the run's result {100 * figure:.2f}% top-1 error" if figure is not None
                else ""))

    return _launched(args, run)


# ------------------------------------------------------------------ predict
def predict_parser() -> argparse.ArgumentParser:
    p = _parser("lsgd-jax predict", "Top-5 classes with probabilities for each image file "
                "(JPEG, PNG, ...; CMYK and grayscale too), through the model's eval transform. "
                "Exit status 1 when some files could not be read as images (each is named).",
                launch=False)
    p.add_argument("--model", required=True, help="a file written by `lsgd-jax export`")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("images", nargs="+", help="image files")
    return p


def predict_main(argv: list[str] | None = None) -> int:
    args = predict_parser().parse_args(argv)
    if args.batch_size < 1:
        return _fail(f"--batch-size must be a positive integer, got {args.batch_size}")
    status = [0]

    def run():
        from lsgd_jax.model_file import load_model
        from lsgd_jax.predict import classify

        model, variables, meta = load_model(args.model)
        results, errors = classify(args.images, model, variables, meta,
                                   batch_size=args.batch_size)
        for path in args.images:
            if path in results:
                best = ", ".join(f"{name} {100 * prob:.1f}%" for name, prob in results[path])
                print(f"{path}: {best}", flush=True)
            else:
                print(f"{path}: not classified: {errors[path]}",
                      file=sys.stderr, flush=True)
        status[0] = 1 if errors else 0

    return main_guard(run) or status[0]


# ------------------------------------------------------------------ lsgd-jax
COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "evaluate": evaluate_main, "export": export_main, "predict": predict_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ("train", *COMMANDS)
    if not argv or argv[0] not in names:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: lsgd-jax {{{','.join(names)}}} ...  (each takes --help)")
            return 0
        return _fail(f"expected a command, one of {', '.join(names)}; got "
                     f"{argv[0] if argv else 'none'} (lsgd-jax COMMAND --help for its flags)")
    if argv[0] == "train":
        from lsgd_jax.cli import main as train_main

        return train_main(argv[1:], prog="lsgd-jax train")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
