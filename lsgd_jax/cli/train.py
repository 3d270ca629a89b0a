"""Command line of ``experiments/imagenet_resnet50.py``: flags -> TrainConfig -> train_and_evaluate.

Every flag defaults to the paper's ImageNet recipe (section 5.1). Launch flags
(processes, fake CPU devices) are handled here, before JAX starts its backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from typing import Any, Callable

from lsgd_jax.training.config import GROUPS, MAX_THREADS, Range, TrainConfig, as_typed, flag_of

# Bounds of the launch flags: a typo past them would reach JAX's C++ as an overflow or
# make devices without bound.
MAX_PROCESSES = 65_536
MAX_TIMEOUT = 86_400  # seconds: a day
PROCESSES = Range(1, MAX_PROCESSES, integer=True)
PROCESS_ID = Range(0, MAX_PROCESSES - 1, integer=True)
TIMEOUT = Range(1, MAX_TIMEOUT, integer=True)
CPU_DEVICES = Range(1, MAX_THREADS, integer=True)

# The groups of --help, in order; each TrainConfig field names its group, except the
# essentials, which come first.
ESSENTIALS = ("data", "model", "batch_size", "epochs")

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
    # Whole epochs read as ints (30, not 30.0); a huge one stays a float, so that the
    # range error shows 1e+30 rather than its 31 digits.
    return tuple(int(v) if v.is_integer() and abs(v) < 2**53 else v for v in values)


# A field's annotation (a string under ``from __future__ import annotations``) -> parser.
_PARSERS = {"int": int, "float": float, "str": str, "bool": _bool,
            "tuple[float, ...]": _epochs_list}


def config_flag(field: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field."""
    return flag_of(field)


class Parser(argparse.ArgumentParser):
    """argparse, whose refusals (an unknown flag, a bad choice, a value that is not a
    number) are one line and a pointer to ``--help`` rather than the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def numeric(group, flag: str, valid: Range, **kwargs) -> argparse.Action:
    """Add a numeric flag that is not a TrainConfig field; :func:`check_flags` holds its
    value to ``valid``."""
    action = group.add_argument(flag, type=int if valid.integer else float, **kwargs)
    action.valid = valid
    return action


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Hold the parsed numeric flags to their ranges (TrainConfig checks its own fields).

    Raises ValueError naming the first flag out of range; it depends on the flags alone,
    so every process of a launch raises the same one.
    """
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if getattr(action, "valid", None) is not None and value is not None:
            action.valid.check(action.option_strings[0], value)
    processes, pid = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    if processes is not None and pid is not None and pid >= processes:
        raise ValueError(f"--process-id must be an integer in [0, {processes - 1}] (below "
                         f"--num-processes {processes}), got {pid}")


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None,
                then: Callable[[argparse.Namespace], Any] = lambda args: None) -> tuple:
    """Parse ``argv`` and check every flag, then ``then(args)`` (which may raise
    ValueError too); returns ``(args, then's result)``. A refusal is one line on stderr
    and SystemExit(2), before anything is started, compiled or written."""
    args = parser.parse_args(argv)
    try:
        check_flags(parser, args)
        return args, then(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows a flag's default as it is typed (``30,60,80``, ``true``), unless it
    has none (None, a switch's False) or its help already says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or "default" in help_text
                or not action.option_strings):
            return help_text
        return f"{help_text} (default: {as_typed(action.default).replace('%', '%%')})"


def build_parser(prog: str = "imagenet_resnet50.py") -> argparse.ArgumentParser:
    """One flag per TrainConfig field (its help, type, choices and default), then the
    launch flags that are not part of a run's configuration. ``prog``: the command's
    name in the usage and in argparse's errors (``lsgd-jax train`` gives its own)."""
    p = Parser(
        prog=prog,
        usage=f"{prog} --workdir DIR [--data NAME] [--model NAME] [--batch-size KN] "
              "[--epochs E] [other flags below]",
        description="Large-minibatch synchronous SGD (Goyal et al. 2017): train ResNet-50 on "
                    "ImageNet, or a small model on synthetic data or Fashion-MNIST, with the "
                    "paper's recipe. Every default is the paper's ImageNet run (90 epochs, "
                    "kn = 256, bfloat16); with another --data and no --epochs or --model, the "
                    "run says so in its first line. Rerunning the same command resumes from the "
                    "latest checkpoint.",
        formatter_class=HelpFormatter)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["essentials"].add_argument("--workdir", required=True, default=argparse.SUPPRESS,
                               help="checkpoints, metrics.jsonl, config.json, TensorBoard "
                                    "(required)")
    groups["run"].add_argument("--restart-from-scratch", action="store_true",
                               help="train from step 0 in a workdir whose checkpoints are all "
                                    "damaged or gone (moved aside or deleted); the old records "
                                    "stay in metrics.jsonl, and the restart is marked there")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        kind = str(f.type).replace(" | None", "")
        kwargs: dict[str, Any] = dict(dest=f.name, help=meta["help"], default=f.default)
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _PARSERS[kind]
            kwargs["metavar"] = config_flag(f)[2:].upper().replace("-", "_")
        if meta["default_text"]:
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] += f" (default: {meta['default_text']})"
        group = "essentials" if f.name in ESSENTIALS else meta["group"]
        groups[group].add_argument(config_flag(f), **kwargs)
    g = p.add_argument_group("processes (multi-host)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0; not needed under SLURM or Open MPI")
    numeric(g, "--num-processes", PROCESSES, default=None,
            help="total number of processes (with --coordinator-address)")
    numeric(g, "--process-id", PROCESS_ID, default=None,
            help="this process, 0 .. num_processes-1")
    numeric(g, "--initialization-timeout", TIMEOUT, default=300,
            help="seconds to wait for the coordinator and every process at the start")
    numeric(g, "--heartbeat-timeout", TIMEOUT, default=100,
            help="seconds after which a silent process is declared dead and the others stop "
                 "(jax.distributed)")
    numeric(g, "--shutdown-timeout", TIMEOUT, default=300,
            help="seconds to wait for every process at exit (jax.distributed)")
    numeric(g, "--cpu-devices", CPU_DEVICES, default=None,
            help="run on N fake CPU devices per process (testing without GPUs)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags; fields whose flag was left out take their default."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def _checked_config(args: argparse.Namespace) -> TrainConfig:
    from lsgd_jax.training.extras import check_for_data

    config = config_from_args(args)
    check_for_data(config.data, config.data_dir)  # a missing extra: one line, before any device
    return config


def train_flags(argv: list[str] | None = None,
                prog: str = "imagenet_resnet50.py") -> tuple[argparse.Namespace, TrainConfig]:
    """The parsed flags of a training run and its TrainConfig, every value checked; a
    refusal is one line and SystemExit(2) (see :func:`parse_flags`)."""
    return parse_flags(build_parser(prog), argv, _checked_config)


_NOT_GIVEN = object()


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags that ``argv`` gives (abbreviations included)."""
    namespace = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in parser._actions
                                      if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not _NOT_GIVEN}


def recipe_notice(config: TrainConfig, given: set[str]) -> str:
    """One line when a data set other than ImageNet is trained on the paper's ImageNet
    recipe because a flag was left out, else "": --epochs (90, decays at 30, 60, 80), or
    --model where the data set has no model of its own (ResNet-50). The defaults stay the
    paper's for every data set, so that a flag left out means the same thing whatever the
    data; only the model has a default per data set (``config.DEFAULT_MODELS``)."""
    from lsgd_jax.training.config import DEFAULT_MODELS

    if config.data in ("imagenet", "synthetic"):
        return ""
    parts = []
    if "epochs" not in given:
        parts.append(f"{as_typed(config.epochs)} epochs with decays at epochs "
                     f"{as_typed(config.decay_epochs)} (--epochs not given)")
    if "model" not in given:
        own = DEFAULT_MODELS.get(config.data, "resnet50") != "resnet50"  # not the paper's
        if not own or parts:
            parts.append(f"{config.model} (--model not given" + (
                f": the default for --data {config.data})" if own else ")"))
    if not parts:
        return ""
    return (f"note: training the paper's ImageNet recipe on --data {config.data}: "
            + "; ".join(parts) + f"; kn = {config.batch_size}, {config.dtype}. Give --epochs "
            "and --model for a run of your own (the README's quickstart trains 2 epochs).")


def main(argv: list[str] | None = None, prog: str = "imagenet_resnet50.py") -> int:
    # Every flag is checked before a process talks to the others or makes a device.
    args, config = train_flags(argv, prog)
    notice = recipe_notice(config, given_flags(build_parser(prog), argv))
    if args.cpu_devices is not None:
        from lsgd_jax.parallel.distributed import use_cpu_devices

        use_cpu_devices(args.cpu_devices)  # before JAX starts its backends

    from lsgd_jax.parallel.distributed import initialize_distributed
    from lsgd_jax.parallel.failures import watch_peers
    from lsgd_jax.training.loop import train_and_evaluate

    def run():
        import jax

        from lsgd_jax.training.library_logs import quiet_exit

        quiet_exit()  # this process is the command's: what libraries print at exit is dropped
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                               initialization_timeout=args.initialization_timeout,
                               heartbeat_timeout=args.heartbeat_timeout,
                               shutdown_timeout=args.shutdown_timeout)
        watch_peers()  # a peer's failure stops this process too, with the peer's message
        for line in ([notice] if notice else []) + config.warnings() if (
                jax.process_index() == 0) else ():
            print(line, flush=True)
        train_and_evaluate(config, args.workdir, restart_from_scratch=args.restart_from_scratch)

    return main_guard(run, workdir=args.workdir)


def main_guard(fn: Callable[[], Any], workdir: str | None = None) -> int:
    """Run ``fn``; turn configuration and data errors into one line and an exit status:
    2 (bad input, damaged data, no room), 3 (a non-finite step), 130 (a second Ctrl-C)."""
    from lsgd_jax.parallel.failures import stop_watching

    try:
        status = _guarded(fn, workdir)
    finally:
        stop_watching()
    return status


def _fail(text: str, status: int) -> int:
    """Print this process's one-line error (naming the process when there are several),
    tell the other processes, and return its exit status (exits when there are peers)."""
    import jax

    from lsgd_jax.parallel.failures import fail_and_exit, yield_to_peer

    yield_to_peer()
    many = jax.distributed.is_initialized() and jax.process_count() > 1
    prefix = f"process {jax.process_index()}: " if many else ""
    print(f"error: {prefix}{text}", file=sys.stderr, flush=True)
    fail_and_exit(text, status)
    return status


def _guarded(fn: Callable[[], Any], workdir: str | None) -> int:
    from lsgd_jax.data.source import BadDataError
    from lsgd_jax.training.checkpoint import CheckpointError
    from lsgd_jax.training.loop import NonFiniteError

    try:
        fn()
    except (ValueError, FileNotFoundError, NonFiniteError, CheckpointError, BadDataError) as e:
        text = str(e)
        if not isinstance(e, CheckpointError) and (
                "No space left on device" in text or "RESOURCE_EXHAUSTED" in text):
            # orbax/tensorstore report a full disk as a ValueError with a long path.
            text = ("no space left on the device while saving a checkpoint "
                    f"({text.splitlines()[0][:300]}); free some space and rerun the same "
                    "command: it resumes from the latest complete checkpoint")
        return _fail(text, 2 if not isinstance(e, NonFiniteError) else 3)
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C; rerun the same command to resume from the latest "
              "complete checkpoint", file=sys.stderr, flush=True)
        from lsgd_jax.parallel.failures import fail_and_exit

        fail_and_exit("aborted by a second Ctrl-C", 130)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            _unexpected(e)
            raise
        where = e.filename or workdir or "the workdir"
        return _fail(f"no space left on the device of {where}; free some space and rerun "
                     "the same command: it resumes from the latest complete checkpoint", 2)
    except Exception as e:
        _unexpected(e)
        raise
    return 0


def _unexpected(error: BaseException) -> None:
    """An error with no one-line form: its traceback, then, when there are other processes,
    its last line to them and the exit (status 1) without the at-exit clean-up that would
    wait for them."""
    import traceback

    from lsgd_jax.parallel.failures import fail_and_exit, yield_to_peer

    yield_to_peer()
    traceback.print_exc()
    import jax

    text = str(error).strip()
    last = f"{type(error).__name__}: {text.splitlines()[-1][:300]}" if text else (
        type(error).__name__)
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        print(f"error: process {jax.process_index()}: {last}", file=sys.stderr, flush=True)
    fail_and_exit(last, 1)


if __name__ == "__main__":
    sys.exit(main())
