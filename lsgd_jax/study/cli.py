"""The command line of the study: ``python experiments/small_scale.py``.

The paper's five claims on the whole of Fashion-MNIST, on a CPU or a GPU.

    nohup nice -n 19 python experiments/small_scale.py --commit > runs/small_scale.log 2>&1 &
    python experiments/small_scale.py --list          # every run's status and command
    python experiments/small_scale.py --report-only   # tables, verdicts and plots only
    python experiments/small_scale.py --quick         # tiny runs of every study (CI)
    python experiments/small_scale.py --section beyond --commit   # LARS and the later recipe

The "beyond" section (``lsgd_jax.study.beyond``) compares, where the paper's recipe
breaks (kn = 512 and 1,024), the paper's recipe, the same with poly decay and label
smoothing, and LARS with that schedule, each at its best of the same 3-point grid.

Studies (Goyal et al. 2017): 1. linear scaling with gradual warmup across kn
(figs. 1-2, table 3a); then, at the largest kn that still matches the reference
(the paper's 8k), 2. warmup: none, constant, gradual (table 1); 3. the rate: η,
η·√k, η·k × ½, 1, 2 (table 2a); 4. zero-γ against γ = 1 (table 2b); 5. eq. (10)
with and without the momentum correction against eq. (9) (section 2.2).

Every run is one ``python -m lsgd_jax train`` command (``--list`` prints
them), run as its own process in its own workdir under ``--out``. A finished run's
``metrics.jsonl`` and ``config.json`` are copied into the results folder
(``<results>/runs/<name>/``), which is what counts as done: a fresh clone with the
committed results skips those runs, and an interrupted run resumes from its
checkpoint. With ``--commit`` each finished run's record, tables and plots are
committed to git at once, so the work survives the end of the machine it ran on.
Reported figure: the paper's, the median top-1 error of the last 5 evaluations
(the last 5/90 of a run), mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import lsgd_jax.study.runner as runner
from lsgd_jax.cli.train import HelpFormatter
from lsgd_jax.study.definitions import (
    FMNIST_DIR,
    MODES,
    STUDY_KEYS,
    Paths,
    Run,
    Scale,
    Study,
    command,
    define_studies,
    order,
    store_large_kn,
    unique_runs,
    write_subset,
)
from lsgd_jax.study.report import write_reports
from lsgd_jax.study.runner import Pool, choose_large_kn, run_error, status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--mode", choices=tuple(MODES), default="cpu",
                   help="cpu: the study on this machine's CPU; gpu: twice the epochs on one "
                        "GPU, 6 runs at once; long: the CPU mode's sweep at 30 epochs (is the "
                        "break at k = 32 the iteration budget?); quick: tiny runs of every "
                        "study (CI)")
    p.add_argument("--quick", action="store_true", help="the same as --mode quick")
    p.add_argument("--out", default=None,
                   help="workdirs (default runs/small_scale[_MODE])")
    p.add_argument("--results", default=None, help="tables, plots and finished runs' records "
                   "(default experiments/results/small_scale[_gpu], or OUT/results with quick)")
    p.add_argument("--fmnist-dir", default=FMNIST_DIR,
                   help="the Fashion-MNIST IDX .gz files (Debian's dataset-fashion-mnist)")
    p.add_argument("--section", choices=("paper", "beyond"), default="paper",
                   help="paper: the paper's five claims; beyond: LARS and the later "
                        "large-batch recipe where the paper's recipe breaks")
    p.add_argument("--only", action="append", default=None, choices=STUDY_KEYS,
                   help="run and report only this study (repeatable)")
    p.add_argument("--large-kn", type=int, default=None,
                   help="kn of the ablations (default: the largest kn that matches)")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs trained at once (default: 1 on a CPU, 6 on a GPU)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no run after this many seconds, then stop the running ones "
                        "(they save a checkpoint and resume on the next call)")
    p.add_argument("--list", action="store_true", help="print every run's status and command")
    p.add_argument("--report-only", action="store_true", help="no training: tables and plots")
    p.add_argument("--commit", action="store_true",
                   help="git-commit the results folder after every finished run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the study; ``--help`` lists the options."""
    p = _parser()
    args = p.parse_args(argv)
    scale, paths = _settings(p, args)
    if args.section == "beyond":
        if args.only or args.large_kn is not None:
            p.error("--only and --large-kn belong to --section paper")
        return _beyond(args, scale, paths)
    studies = define_studies(scale, paths, args.large_kn)
    if args.list:
        for run in unique_runs(_selected(studies, args)):
            print(f"[{status(run)}] python " + " ".join(command(run)))
        if len(studies) == 1 and scale.ablations:
            print("(the ablations are defined once the sweep's seeded rows are finished)")
        return 0
    if not args.report_only:
        studies = _run_paper(args, scale, paths, studies)
    for path in write_reports(studies, scale, paths):
        print(path)
    return 0


def _settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Scale, Paths]:
    """The mode's scale (with --parallel) and the study's folders, the flags checked."""
    mode = "quick" if args.quick else args.mode
    scale = MODES[mode]
    if args.parallel is not None:
        if args.parallel < 1:
            p.error(f"--parallel must be at least 1, got {args.parallel}")
        scale = dataclasses.replace(scale, parallel=args.parallel)
    suffix = "" if mode == "cpu" else f"_{mode}"
    out = args.out or f"runs/small_scale{suffix}"
    results = args.results or (os.path.join(out, "results") if mode == "quick"
                               else os.path.join("experiments", "results",
                                                 f"small_scale{suffix}"))
    if args.large_kn is not None and args.large_kn not in scale.kn_sweep:
        p.error(f"--large-kn must be one of the sweep's kn {scale.kn_sweep}, got {args.large_kn}")
    return scale, Paths(out=out, results=results, source=args.fmnist_dir)


def _selected(studies: list[Study], args: argparse.Namespace) -> list[Study]:
    return [s for s in studies if not args.only or s.key in args.only]


def _run_paper(args: argparse.Namespace, scale: Scale, paths: Paths,
               studies: list[Study]) -> list[Study]:
    """Run the paper section's unfinished runs (several at once with --parallel), then the
    ablations at the kn the sweep chose; reports (and commits) each run as it finishes.
    Returns the studies as finally defined."""
    t_start = time.time()
    pool = Pool(scale, os.path.join(paths.out, "logs") if scale.parallel > 1 else None)

    def finished(run: Run, after: str, seconds: float) -> None:
        print(f"=== {run.name}: {after} in {seconds:.0f} s ===", flush=True)
        touched = {s.key for s in studies if any(run in row.runs for row in s.rows)}
        write_reports(studies, scale, paths, only=touched)
        if args.commit:
            error = run_error(run)
            figure = f"{error:.2f} %" if isinstance(error, float) else str(error)
            runner.git_commit(paths, f"Small-scale study ({scale.name}): {run.name} finished, "
                              f"{figure} top-1 error")

    while True:
        if scale.subset:
            write_subset(scale, paths)
        out_of_time = args.time_limit is not None and time.time() - t_start > args.time_limit
        todo = [] if out_of_time else order(
            [r for r in unique_runs(_selected(studies, args))
             if status(r) not in ("done", "diverged") and r.name not in pool.running], scale)
        if out_of_time and pool.running:
            print(f"=== time limit of {args.time_limit:g} s reached: stopping "
                  f"{', '.join(pool.running)} ===", flush=True)
            pool.stop()
        if not todo and not pool.running:
            if (out_of_time or len(studies) > 1 or not scale.ablations
                    or (args.only and "kn_sweep" not in args.only)):
                return studies
            chosen = choose_large_kn(studies[0], scale)
            if chosen is None:
                return studies
            store_large_kn(paths, *chosen)
            studies = define_studies(scale, paths, args.large_kn)
            continue
        if scale.parallel == 1:
            run = todo[0]
            t0 = time.time()
            print(f"=== {run.name} ({status(run)}; {len(todo)} runs left) ===", flush=True)
            finished(run, runner.execute(run, scale), time.time() - t0)
            continue
        while todo and len(pool.running) < scale.parallel:
            run = todo.pop(0)
            print(f"=== {run.name} ({status(run)}; started with {len(pool.running)} others, "
                  f"{len(todo)} waiting) ===", flush=True)
            pool.start(run)
        run, after, seconds = pool.wait_one()
        if after == "partial":  # SIGTERM from outside: stop the rest, they resume later
            pool.stop()
            raise KeyboardInterrupt(f"{run.name} stopped by SIGTERM; rerun to resume")
        finished(run, after, seconds)


def _beyond(args: argparse.Namespace, scale, paths: Paths) -> int:
    """The "beyond" section: the grid on seed 0, then 3 seeds of each recipe's best rate
    (defined as each grid is finished), resumable and committed run by run."""
    from lsgd_jax.study.beyond import define_beyond, write_beyond_reports

    if args.list:
        for run in unique_runs(define_beyond(scale, paths)):
            print(f"[{status(run)}] python " + " ".join(command(run)))
        print("(seeds 1 and 2 of a recipe are defined once its grid on seed 0 is finished)")
        return 0
    t_start = time.time()
    pool = Pool(scale, os.path.join(paths.out, "logs") if scale.parallel > 1 else None)

    def finished(run: Run, after: str, seconds: float) -> None:
        print(f"=== {run.name}: {after} in {seconds:.0f} s ===", flush=True)
        write_beyond_reports(define_beyond(scale, paths), scale, paths)
        if args.commit:
            error = run_error(run)
            figure = f"{error:.2f} %" if isinstance(error, float) else str(error)
            runner.git_commit(paths, f"Small-scale study ({scale.name}), beyond the paper's "
                              f"limit: {run.name} finished, {figure} top-1 error")

    while not args.report_only:
        if scale.subset:
            write_subset(scale, paths)
        studies = define_beyond(scale, paths)  # seeds appear as each grid is finished
        out_of_time = args.time_limit is not None and time.time() - t_start > args.time_limit
        todo = [] if out_of_time else order(
            [r for r in unique_runs(studies)
             if status(r) not in ("done", "diverged") and r.name not in pool.running], scale)
        if out_of_time and pool.running:
            pool.stop()
        if not todo and not pool.running:
            break
        if scale.parallel == 1:
            run, t0 = todo[0], time.time()
            print(f"=== {run.name} ({status(run)}; {len(todo)} runs defined and left) ===",
                  flush=True)
            finished(run, runner.execute(run, scale), time.time() - t0)
            continue
        while todo and len(pool.running) < scale.parallel:
            pool.start(todo.pop(0))
        run, after, seconds = pool.wait_one()
        if after == "partial":
            pool.stop()
            raise KeyboardInterrupt(f"{run.name} stopped by SIGTERM; rerun to resume")
        finished(run, after, seconds)
    for path in write_beyond_reports(define_beyond(scale, paths), scale, paths):
        print(path)
    return 0
