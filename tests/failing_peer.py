"""One of two processes fails while the other waits in a collective (tests/test_failures.py).

    python failing_peer.py COORDINATOR PROCESS_ID FAILING_ID

Both run the command line's guard (``lsgd_jax.cli.train.main_guard``) around a loop of
cross-process all-reduces; process FAILING_ID raises an out-of-memory error as XLA
reports it after a few of them, while its peer is inside the next one.
"""

import sys

from lsgd_jax.parallel.distributed import use_cpu_devices

use_cpu_devices(1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lsgd_jax.cli.train import main_guard  # noqa: E402
from lsgd_jax.parallel.distributed import initialize_distributed  # noqa: E402
from lsgd_jax.parallel.failures import watch_peers  # noqa: E402


def main() -> int:
    coordinator, me, failing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def run():
        initialize_distributed(coordinator, 2, me, heartbeat_timeout=30, shutdown_timeout=10)
        watch_peers()
        from jax.experimental import multihost_utils

        for step in range(1_000_000):
            if me == failing and step == 3:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                   "123456789 bytes (a stand-in for XLA's report)")
            multihost_utils.process_allgather(np.full(4, step, np.float32))
            print(f"step {step} on process {jax.process_index()}", flush=True)

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
