"""Agreement between processes: one helper, :func:`exchange`, and what is built on it.

Every decision that the processes of a run must take alike (a verdict read by process 0,
the worst outcome of a checkpoint read, whether a check held everywhere) goes through
:func:`exchange`: each process posts a JSON value to the coordination service's key-value
store and reads every other's. It is not a collective, so a process that fails before it
arrives stops the others through :mod:`lsgd_jax.parallel.failures` with its own message,
never through a collective that aborts without one. With one process every helper returns
at once and needs no runtime.

Every process must call the helpers in the same order with the same names (as it must
call collectives); the count of calls per name keys each exchange.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax

# Calls per name on this process: the same sequence on every process keys each exchange.
_CALLS: collections.Counter = collections.Counter()
# An exchange's keys are removed two calls of the same name later: by then every process
# has read them (a process posts call n + 1 only after reading every key of call n).
_KEEP_CALLS = 2


def exchange(name: str, value: Any, *, timeout: float = 300.0) -> list[Any]:
    """Every process's ``value`` (JSON-serialisable), in process order.

    Args:
      name: what is being agreed on; every process calls with the same names in the
        same order.
      value: this process's value.
      timeout: seconds to wait for the slowest process.
    """
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client: "
                           "start them with lsgd_jax.initialize_distributed")
    _CALLS[name] += 1
    call = _CALLS[name]
    me = jax.process_index()
    client.key_value_set(_key(name, call, me), json.dumps(value, sort_keys=True))
    values = [json.loads(client.blocking_key_value_get(_key(name, call, i),
                                                       int(timeout * 1000)))
              for i in range(jax.process_count())]
    if call > _KEEP_CALLS:  # keep the store small on runs of many days
        try:
            client.key_value_delete(_key(name, call - _KEEP_CALLS, me))
        except Exception:  # noqa: BLE001 (a key already gone is no harm)
            pass
    return values


def _key(name: str, call: int, process: int) -> str:
    return f"lsgd_jax/agree/{name}/{call}/{process}"


def from_process_0(value: Any, name: str = "from_process_0") -> Any:
    """Process 0's ``value`` on every process (a verdict only process 0 can read: all
    processes then raise the same error, or none)."""
    return exchange(name, value)[0]


def worst(outcome: int, name: str = "worst") -> int:
    """The largest ``outcome`` over all processes (outcomes ordered by precedence)."""
    return max(exchange(name, int(outcome)))


def everywhere(ok: bool, name: str = "everywhere") -> bool:
    """True when ``ok`` holds on every process."""
    return all(exchange(name, bool(ok)))
