"""The ``lsgd-jax`` command: ``train``, ``curves``, ``evaluate``, ``export`` and ``predict``.

``lsgd-jax train`` takes the flags of ``experiments/imagenet_resnet50.py``
(:mod:`lsgd_jax.cli.train`); the others take those of ``experiments/plot_curves.py``,
``evaluate.py``, ``export.py`` and ``predict.py``, which call the functions here. ``python -m
lsgd_jax`` is the same command. Bad input (a flag, a workdir without checkpoints, a
damaged checkpoint or model file) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from lsgd_jax.cli.train import (
    CPU_DEVICES,
    PROCESS_ID,
    PROCESSES,
    TIMEOUT,
    Parser,
    main_guard,
    numeric,
    parse_flags,
)
from lsgd_jax.training.config import MAX_BATCH, MAX_STEPS, Range
from lsgd_jax.training.metrics import plural

BATCH = Range(1, MAX_BATCH, integer=True)


def _parser(prog: str, description: str, *, launch: bool = True) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description)
    if launch:
        g = p.add_argument_group("processes (multi-host, as for training)")
        g.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0; not needed under SLURM or Open MPI")
        numeric(g, "--num-processes", PROCESSES, default=None, help="total processes")
        numeric(g, "--process-id", PROCESS_ID, default=None, help="this process")
        numeric(g, "--initialization-timeout", TIMEOUT, default=300,
                help="seconds to wait for the coordinator and every process")
        numeric(g, "--cpu-devices", CPU_DEVICES, default=None,
                help="run on N fake CPU devices per process (testing without GPUs)")
    return p


def _workdir_flags(p: argparse.ArgumentParser, *, writes: str = "") -> None:
    p.add_argument("--workdir", required=True, help="the training run's --workdir; its "
                   "checkpoints are only read" + writes)
    numeric(p, "--step", Range(0, MAX_STEPS, integer=True), default=None,
            help="the checkpoint to read (default: the newest that verifies)")


def _start(args) -> None:
    """Sets up fake CPU devices (the flags are checked); the processes start in
    :func:`_launched`."""
    if getattr(args, "cpu_devices", None) is not None:
        from lsgd_jax.parallel.distributed import use_cpu_devices

        use_cpu_devices(args.cpu_devices)  # before JAX starts its backends


def _launched(args, fn: Callable[[], None]) -> int:
    """Start the processes (multi-host), then ``fn``, both under ``main_guard``, as
    training does: a launch that fails is one line and exit status 2 too."""
    def run():
        import os

        from lsgd_jax.parallel.distributed import initialize_distributed
        from lsgd_jax.parallel.failures import watch_peers
        from lsgd_jax.training.library_logs import diverted, quiet_exit

        # A reader writes nothing into the workdir: orbax's and asyncio's tracebacks of a
        # damaged checkpoint are dropped; the command's own line says what happened.
        quiet_exit()
        with diverted(os.devnull):
            initialize_distributed(args.coordinator_address, args.num_processes,
                                   args.process_id,
                                   initialization_timeout=args.initialization_timeout)
            watch_peers()  # a peer's failure ends this process too, with the peer's message
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
def evaluating_line(workdir: str, step: int, num_devices: int) -> str:
    from lsgd_jax.training.metrics import plural

    return (f"evaluating {workdir}/checkpoints/{step} (state SHA-256 verified) on "
            f"{plural(num_devices, 'device')}")


def evaluate_parser() -> argparse.ArgumentParser:
    p = _parser("lsgd-jax evaluate", "Evaluate a training run's checkpoint on the whole "
                "validation split (top-1 and top-5 error, exact: every image once, on any "
                "number of devices). Writes one thing: an `eval` record with source "
                "\"evaluate\", appended to WORKDIR/metrics.jsonl (none with --no-record); the "
                "checkpoints are only read, and the run's lock is not taken.")
    _workdir_flags(p, writes=" (an `eval` record is appended to its metrics.jsonl)")
    numeric(p, "--eval-batch-size", BATCH, default=None,
            help="global batch of the pass (default: the run's)")
    p.add_argument("--data-dir", default=None, help="where the data lies on this host "
                   "(default: the run's --data-dir)")
    p.add_argument("--no-record", action="store_true",
                   help="do not append the result to WORKDIR/metrics.jsonl")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    args, _ = parse_flags(evaluate_parser(), argv)  # a bad value: one line, SystemExit(2)
    _start(args)

    def run():
        import jax

        from lsgd_jax.artifacts.readback import evaluate_run, restore_run
        from lsgd_jax.training.metrics import MetricsWriter

        restored = restore_run(args.workdir, step=args.step, log=_log)
        _log(evaluating_line(restored.workdir, restored.step, restored.mesh.devices.size))
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
    p.add_argument("--out", required=True, help="the model file, e.g. WORKDIR/model.msgpack")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args, _ = parse_flags(export_parser(), argv)  # a bad value: one line, SystemExit(2)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return _fail(f"--out {args.out}: the folder {out_dir} does not exist; create it or "
                     "choose another path")
    _start(args)

    def run():
        from lsgd_jax.artifacts.readback import restore_run
        from lsgd_jax.training.model_file import export_model, sidecar_path

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
                "Says on stderr what the model expects (its data set, image size and colours), "
                "and warns once when images differ a lot from its training images. "
                "Exit status 1 when some files could not be read as images (each is named).",
                launch=False)
    p.add_argument("--model", required=True, help="a file written by `lsgd-jax export`")
    numeric(p, "--batch-size", BATCH, default=32, help="images per forward pass")
    p.add_argument("images", nargs="+", help="image files")
    return p


def predict_main(argv: list[str] | None = None) -> int:
    args, _ = parse_flags(predict_parser(), argv)  # a bad value: one line, SystemExit(2)
    status = [0]

    def run():
        from lsgd_jax.artifacts.predict import classify, expectation
        from lsgd_jax.training.model_file import load_model

        model, variables, meta = load_model(args.model)
        print(expectation(meta), file=sys.stderr, flush=True)
        unlike: dict[str, str] = {}
        results, errors = classify(args.images, model, variables, meta,
                                   batch_size=args.batch_size, unlike=unlike)
        for path in args.images:
            if path in results:
                best = ", ".join(f"{name} {100 * prob:.1f}%" for name, prob in results[path])
                print(f"{path}: {best}", flush=True)
            else:
                print(f"{path}: not classified: {errors[path]}",
                      file=sys.stderr, flush=True)
        if unlike:  # once, however many images
            first, reason = next(iter(unlike.items()))
            more = f"; and {len(unlike) - 1} more" if len(unlike) > 1 else ""
            print(f"warning: {plural(len(unlike), 'image')} of {len(args.images)} "
                  f"{'differs' if len(unlike) == 1 else 'differ'} a lot from the training "
                  f"images ({first}: {reason}{more}); the model's answers for "
                  f"{'it' if len(unlike) == 1 else 'them'} mean little", file=sys.stderr,
                  flush=True)
        status[0] = 1 if errors else 0

    return main_guard(run) or status[0]


# ------------------------------------------------------------------ curves
def curves_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lsgd-jax curves", description="Draw the training and validation curves "
               "of one or more runs into a PNG: training error and loss, validation top-1 "
               "error with the evaluations of the paper's metric and the result marked, and "
               "the learning rate. Reads WORKDIR/metrics.jsonl and config.json only (runs in "
               "progress too). Needs matplotlib, the plot extra.")
    p.add_argument("workdirs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("-o", "--output", default=None,
                   help="PNG to write (default: curves.png in the first run's directory)")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs")
    p.add_argument("--reference", default=None, help="a run drawn in black underneath")
    p.add_argument("--title", default=None, help="the figure's title (default: the run's "
                   "name, or the number of runs)")
    numeric(p, "--smooth", Range(1, 10_000, integer=True), default=1,
            help="moving average over this many logged training points (default: 1)")
    return p


def curves_main(argv: list[str] | None = None, prog: str = "lsgd-jax curves") -> int:
    parser = curves_parser()
    parser.prog = prog
    args, _ = parse_flags(parser, argv)  # a bad value: one line, SystemExit(2)
    missing = [w for w in args.workdirs + ([args.reference] if args.reference else [])
               if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
    if missing:
        return _fail(f"no metrics.jsonl in {', '.join(missing)}; give a training run's "
                     "--workdir")
    try:
        from lsgd_jax.training.extras import require

        require("plot")
        from lsgd_jax.artifacts.plotting import plot_runs

        path = plot_runs(args.workdirs, args.output,
                         labels=args.labels.split(",") if args.labels else None,
                         reference=args.reference, title=args.title, smooth=args.smooth)
    except ValueError as e:  # a missing extra, no records, labels that do not match
        return _fail(str(e))
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ lsgd-jax
COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "curves": curves_main, "evaluate": evaluate_main, "export": export_main,
    "predict": predict_main}

# What each command does, for ``lsgd-jax --help``.
SUMMARIES = {
    "train": "train a ResNet with the paper's recipe into --workdir; the same command resumes",
    "curves": "draw a run's training and validation curves into WORKDIR/curves.png",
    "evaluate": "evaluate a run's checkpoint on the whole validation split",
    "export": "write a run's weights to a model file (for predict and --init-from)",
    "predict": "classify image files with an exported model",
}


def usage() -> str:
    """``lsgd-jax --help``: each command with one line of what it does."""
    width = max(map(len, SUMMARIES))
    return "\n".join(["usage: lsgd-jax COMMAND [FLAGS]   (lsgd-jax COMMAND --help lists its "
                      "flags)", "", "commands:"]
                     + [f"  {name:<{width}}  {text}" for name, text in SUMMARIES.items()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ("train", *COMMANDS)
    if not argv or argv[0] not in names:
        if argv and argv[0] in ("-h", "--help"):
            print(usage())
            return 0
        return _fail(f"expected a command, one of {', '.join(names)}; got "
                     f"{argv[0] if argv else 'none'} (lsgd-jax --help says what each does)")
    if argv[0] == "train":
        from lsgd_jax.cli.train import main as train_main

        return train_main(argv[1:], prog="lsgd-jax train")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
