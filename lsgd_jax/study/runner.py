"""Running the study: a run's status, its process (alone or several at once), its record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from lsgd_jax.study.definitions import (
    DIVERGED,
    TRAINER,
    Paths,
    Run,
    Scale,
    Study,
    command,
)
from lsgd_jax.study.verdicts import aggregate, verdict_matches
from lsgd_jax.training.metrics import eval_history, paper_error, read_metrics


def status(run: Run) -> str:
    """"done", "diverged", "partial" (has metrics, resumes) or "missing".

    The record in the results folder decides first: it is what a fresh clone has.
    """
    for folder in (run.record, run.workdir):
        if os.path.exists(os.path.join(folder, DIVERGED)):
            return "diverged"
        if any(r.get("kind") == "result" for r in read_metrics(folder)):
            return "done"
    return "partial" if read_metrics(run.workdir) else "missing"


def metrics_dir(run: Run) -> str:
    """Where the run's metrics are read from: its record when it has one."""
    return run.record if read_metrics(run.record) else run.workdir


def keep_record(run: Run) -> None:
    """Copy a finished (or diverged) run's metrics and config into its record folder."""
    os.makedirs(run.record, exist_ok=True)
    for name in ("metrics.jsonl", "config.json", DIVERGED):
        src = os.path.join(run.workdir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(run.record, name))


def start(run: Run, scale: Scale, log: str | None = None) -> subprocess.Popen:
    """Start training (or resuming) one run as its own process."""
    os.makedirs(run.workdir, exist_ok=True)
    env = dict(os.environ)
    # Runs of one kn and schedule (the seeds) share their compiled programs.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(run.workdir),
                                                             "jax_cache"))
    if scale.parallel > 1 and scale.platform != "cpu":
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU's memory
    out = open(log, "a") if log else None
    try:
        return subprocess.Popen([sys.executable, *command(run)], env=env,
                                stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def finish(run: Run, returncode: int) -> str:
    """Record a run whose process ended; returns its status ("partial": stopped by SIGTERM)."""
    if returncode == 3:  # the trainer's exit status for a non-finite step
        mark_diverged(run.workdir, f"{TRAINER} exited with status 3 (non-finite step)")
    elif returncode != 0:  # a preempted trainer saves and exits 0
        raise RuntimeError(f"{run.name} failed with exit status {returncode}"
                           f" (its log: {os.path.join(run.workdir, 'train.log')})")
    state = status(run)
    if state != "partial":
        keep_record(run)
    return state


def execute(run: Run, scale: Scale) -> str:
    """Train (or resume) one run in the foreground; returns its status afterwards."""
    state = finish(run, start(run, scale).wait())
    if state == "partial":  # SIGTERM: saved; stop the suite rather than start the next run
        raise KeyboardInterrupt(f"{run.name} stopped by SIGTERM; rerun to resume")
    return state


def mark_diverged(workdir: str, message: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, DIVERGED), "w") as f:
        json.dump({"message": message, "time": time.time()}, f)


def run_error(run: Run) -> float | str | None:
    """The paper's figure for a finished run (in %), "diverged", or None if not finished."""
    state = status(run)
    if state != "done":
        return "diverged" if state == "diverged" else None
    results = [r for r in read_metrics(metrics_dir(run), "result")]
    if results and "median_top1_error" in results[-1]:
        return 100 * results[-1]["median_top1_error"]
    return 100 * paper_error([r["top1_error"] for r in eval_history(metrics_dir(run)).values()])


def run_seconds(run: Run) -> float | None:
    """Wall time of a finished run from its records (first to last), resumes included."""
    records = read_metrics(metrics_dir(run))
    times = [r["time"] for r in records if "time" in r]
    return max(times) - min(times) if len(times) > 1 else None


def choose_large_kn(sweep: Study, scale: Scale) -> tuple[int, str] | None:
    """The kn of the ablations (the paper's 8k) and why, once every seeded row is done.

    The largest kn of the sweep that matches the reference at 95 % (the paper's choice).
    When none does because the seeds spread too much to tell, the largest kn whose mean
    is within the tolerance of the reference's; else the reference doubled. None while a
    seeded row of the sweep is unfinished.
    """
    rows = [r for r in sweep.rows if int(r.runs[0].flag("--batch-size")) // scale.reference_kn
            <= scale.seeded_k]
    aggs = [aggregate([run_error(run) for run in row.runs]) for row in rows]
    if any(a["missing"] for a in aggs):
        return None
    tol, ref = scale.tolerance, aggs[0]
    kns = [int(row.runs[0].flag("--batch-size")) for row in rows]
    matching = [kn for kn, agg in zip(kns[1:], aggs[1:])
                if verdict_matches(agg, ref, tol)[0] == "matches"]
    if matching:
        return max(matching), (f"the largest kn of the sweep that matches the reference "
                               f"within {tol:g} points")
    close = [kn for kn, agg in zip(kns[1:], aggs[1:]) if agg["finished"]
             and agg["mean"] - ref["mean"] <= tol and verdict_matches(agg, ref, tol)[0]
             != "does not match"]
    if close:
        return max(close), (f"no kn matches the reference at 95 % (the seeds spread too "
                            f"much); the largest whose mean is within {tol:g} points of it")
    return scale.reference_kn * 2, "no kn is within the tolerance: the reference doubled"



class Pool:
    """Up to ``scale.parallel`` runs training at once, each its own process."""

    def __init__(self, scale: Scale, log_dir: str | None):
        self.scale, self.log_dir = scale, log_dir
        self.running: dict[str, tuple[Run, subprocess.Popen, float]] = {}

    def start(self, run: Run) -> None:
        log = os.path.join(self.log_dir, f"{run.name}.log") if self.log_dir else None
        if log:
            os.makedirs(self.log_dir, exist_ok=True)
        self.running[run.name] = (run, start(run, self.scale, log), time.time())

    def wait_one(self) -> tuple[Run, str, float]:
        """Block until a run's process ends; its status and seconds."""
        while True:
            for name, (run, proc, t0) in list(self.running.items()):
                if proc.poll() is not None:
                    del self.running[name]
                    return run, finish(run, proc.returncode), time.time() - t0
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every run (each saves a checkpoint and resumes on the next call)."""
        for _, proc, _ in self.running.values():
            proc.terminate()
        for run, proc, _ in self.running.values():
            proc.wait()
            if proc.returncode == 0 and status(run) == "done":  # it finished meanwhile
                keep_record(run)
        self.running.clear()


def git_commit(paths: Paths, message: str) -> None:
    """Commit the results folder alone (other staged work is left as it is), in the
    repository that holds it (which may be another checkout than the running code's)."""
    results = os.path.abspath(paths.results)
    repo = os.path.dirname(results)
    readme = os.path.join(repo, "README.md")  # its snapshot section (update_readme)
    targets = [results] + ([readme] if os.path.exists(readme) else [])
    for attempt in range(5):
        add = subprocess.run(["git", "-C", repo, "add", "-A", *targets],
                             capture_output=True, text=True)
        done = subprocess.run(["git", "-C", repo, "commit", "-q", "-m", message, "--", *targets],
                              capture_output=True, text=True)
        if add.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
            return
        time.sleep(2 + 3 * attempt)  # another git command holds the index lock
    print(f"warning: could not commit {paths.results}: {done.stderr.strip()}", file=sys.stderr)
