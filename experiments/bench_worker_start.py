"""The decoding workers' forkserver: its start time and memory, and the modules a worker has.

The forkserver imports ``lsgd_jax.data.workers`` once and forks every decoding worker
from itself, so what that import pulls in is paid once per process at start, and shared
by every worker's pages. This prints the server's start (to a first worker running) and
its resident memory, for the workers' module as it is (NumPy and PIL; no jax) and, for
comparison, with the training loop preloaded as well (jax, flax, optax, orbax: what the
workers' import cost before the package was layered).

    python experiments/bench_worker_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.forkserver as forkserver
import statistics
import time

HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _probe(queue) -> None:
    import sys

    queue.put(sorted(m for m in HEAVY if m in sys.modules))


def one(preload: list[str]) -> tuple[float, float, list[str]]:
    """(seconds to a first worker, the server's RSS in MiB, heavy modules in a worker)."""
    server = forkserver._forkserver
    server._stop()  # a fresh server for each measurement
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    queue = ctx.SimpleQueue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_probe, args=(queue,))
    proc.start()
    heavy = queue.get()
    seconds = time.perf_counter() - t0
    proc.join()
    return seconds, _rss_mib(server._forkserver_pid), heavy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cases = {"lsgd_jax.data.workers (as run)": ["lsgd_jax.data.workers"],
             "+ the training loop (jax, flax, orbax)": ["lsgd_jax.data.workers",
                                                        "lsgd_jax.training.loop"]}
    print("| forkserver preload | start to a first worker, s | server RSS, MiB | "
          "heavy modules in a worker |")
    print("|---|---|---|---|")
    for name, preload in cases.items():
        runs = [one(preload) for _ in range(args.repeats)]
        print(f"| {name} | {statistics.median(r[0] for r in runs):.2f} | "
              f"{statistics.median(r[1] for r in runs):.0f} | {', '.join(runs[-1][2]) or 'none'} |",
              flush=True)


if __name__ == "__main__":
    main()
