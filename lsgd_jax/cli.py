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

from lsgd_jax.config import TrainConfig

# The groups of --help, in order; each TrainConfig field names its group.
GROUPS = {"run": "run", "data": "data", "model": "model",
          "minibatch": "minibatch (kn = k workers × n images)", "schedule": "schedule",
          "optimizer": "optimizer", "checkpoints and logging": "checkpoints and logging",
          "speed": "speed (the same results computed another way; see the README)"}


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


# A field's annotation (a string under ``from __future__ import annotations``) -> parser.
_PARSERS = {"int": int, "float": float, "str": str, "bool": _bool,
            "tuple[float, ...]": _epochs_list}


def config_flag(field: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows a flag's default, unless it has none (None, a switch's False) or
    its help already says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or action.default is False or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser(prog: str = "imagenet_resnet50.py") -> argparse.ArgumentParser:
    """One flag per TrainConfig field (its help, type, choices and default), then the
    launch flags that are not part of a run's configuration. ``prog``: the command's
    name in the usage and in argparse's errors (``lsgd-jax train`` gives its own)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Large-minibatch synchronous SGD (Goyal et al. 2017): train ResNet-50 on "
                    "ImageNet, or a small model on synthetic data or Fashion-MNIST, with the "
                    "paper's recipe. Rerunning with the same --workdir resumes from the latest "
                    "checkpoint.",
        formatter_class=HelpFormatter)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["run"].add_argument("--workdir", required=True, default=argparse.SUPPRESS,
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
        groups[meta["group"]].add_argument(config_flag(f), **kwargs)
    g = p.add_argument_group("processes (multi-host)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0; not needed under SLURM or Open MPI")
    g.add_argument("--num-processes", type=int, default=None,
                   help="total number of processes (with --coordinator-address)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process, 0 .. num_processes-1")
    g.add_argument("--initialization-timeout", type=int, default=300,
                   help="seconds to wait for the coordinator and every process at the start")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process is declared dead and the "
                        "others stop (jax.distributed)")
    g.add_argument("--shutdown-timeout", type=int, default=300,
                   help="seconds to wait for every process at exit (jax.distributed)")
    g.add_argument("--cpu-devices", type=int, default=None,
                   help="run on N fake CPU devices per process (testing without GPUs)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags; fields whose flag was left out take their default."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def main(argv: list[str] | None = None, prog: str = "imagenet_resnet50.py") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        # Validate the configuration before any process starts talking to the others.
        config = config_from_args(args)
        for flag in ("cpu_devices", "initialization_timeout", "heartbeat_timeout",
                     "shutdown_timeout"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, "
                                 f"got {value}")
    except ValueError as e:
        # One line, like every other error of the run (the usage is in --help).
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.cpu_devices is not None:
        from lsgd_jax.parallel import use_cpu_devices

        use_cpu_devices(args.cpu_devices)  # before JAX starts its backends

    from lsgd_jax.parallel import initialize_distributed
    from lsgd_jax.train import train_and_evaluate

    def run():
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                               initialization_timeout=args.initialization_timeout,
                               heartbeat_timeout=args.heartbeat_timeout,
                               shutdown_timeout=args.shutdown_timeout)
        train_and_evaluate(config, args.workdir, restart_from_scratch=args.restart_from_scratch)

    return main_guard(run, workdir=args.workdir)


def main_guard(fn: Callable[[], Any], workdir: str | None = None) -> int:
    """Run ``fn``; turn configuration and data errors into one line and an exit status:
    2 (bad input, damaged data, no room), 3 (a non-finite step), 130 (a second Ctrl-C)."""
    from lsgd_jax.checkpoint import CheckpointError
    from lsgd_jax.data.source import BadDataError
    from lsgd_jax.train import NonFiniteError

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
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 2 if not isinstance(e, NonFiniteError) else 3
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C; rerun the same command to resume from the latest "
              "complete checkpoint", file=sys.stderr, flush=True)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        where = e.filename or workdir or "the workdir"
        print(f"error: no space left on the device of {where}; free some space and rerun the "
              "same command: it resumes from the latest complete checkpoint",
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
