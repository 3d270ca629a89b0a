"""Interleaved A/B timing of compiled train steps that differ only in speed switches.

Used by ``experiments/bench_train_step.py --variant``. Each variant is a name and its
settings (:data:`VARIANT_KEYS`); every variant is compiled in one process and timed
in rounds of one window each, in turn, so that clock and thermal drift hit all of them
alike. A variant's figure is its median window.

:func:`combination` builds the reference with every lever of the variants that beat
it: for each switch, the value of the fastest winning variant that set it; XLA
options are pooled. BN group size is not a lever (it changes the results), so a
variant that changes it is never combined.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import time

import jax
import jax.numpy as jnp

from lsgd_jax.parallel.distributed import InFlight

# Settings a variant may change; the others are the same for every variant.
VARIANT_KEYS = ("bn_group_size", "bn_impl", "bn_split_rows", "pool_impl", "stem_impl",
                "xla_option")
LEVER_KEYS = VARIANT_KEYS[1:]  # same results whatever their value; BN groups are not


@dataclasses.dataclass
class Variant:
    """A named set of :data:`VARIANT_KEYS` (the bench's flags of the same names)."""

    name: str
    settings: argparse.Namespace  # the VARIANT_KEYS as attributes; xla_option a list

    def key(self, name: str):
        value = getattr(self.settings, name)
        return tuple(sorted(value)) if name == "xla_option" else value

    def flags(self) -> str:
        """The command-line flags that reproduce this variant."""
        s = self.settings
        out = [f"--bn-group-size {s.bn_group_size}", f"--bn-impl {s.bn_impl}",
               f"--bn-split-rows {s.bn_split_rows}", f"--pool-impl {s.pool_impl}",
               f"--stem-impl {s.stem_impl}"]
        return " ".join(out + [f"--xla-option {shlex.quote(o)}" for o in sorted(s.xla_option)])


def xla_options(option_list: list[str]) -> dict:
    """["name=value", ...] as compiler options: true/false as booleans, integers as int."""
    out = {}
    for item in option_list:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"--xla-option must be NAME=VALUE with an xla_ NAME, got {item!r}")
        low = value.lower()
        out[name] = (low == "true" if low in ("true", "false")
                     else int(value) if value.lstrip("-").isdigit() else value)
    return out


def unknown_option(option_list: list[str]) -> str | None:
    """None if this jaxlib compiles with these options, else the reason (a cheap compile)."""
    try:
        options = xla_options(option_list)
        if options:
            jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
                compiler_options=options)
    except Exception as e:  # noqa: BLE001 - the message is what the user needs
        return str(e).splitlines()[0]
    return None


@dataclasses.dataclass
class Built:
    """A variant's compiled step, its state and its timed windows (seconds per step)."""

    variant: Variant
    compiled: object
    lowered: object
    state: object
    layout: object
    compile_s: float
    windows: list = dataclasses.field(default_factory=list)
    metrics: object = None

    @property
    def step_s(self) -> float:
        return sorted(self.windows)[len(self.windows) // 2]  # the median window


def run_steps(b: Built, batch, steps: int) -> float:
    """Run ``steps`` steps of one variant; seconds per step."""
    # Step t runs while the host waits for step t-1 (InFlight): an unbounded queue of
    # all-reduce programs aborts on CPU devices, and on a GPU one step ahead keeps it busy.
    inflight = InFlight(depth=2)
    t0 = time.perf_counter()
    for _ in range(steps):
        b.state, b.metrics = b.compiled(b.state, batch)
        inflight.push(b.metrics)
    inflight.drain()
    jax.block_until_ready(b.state)
    return (time.perf_counter() - t0) / max(steps, 1)


def time_rounds(built: list[Built], batch, *, warmup: int, steps: int,
                repeats: int) -> list[Built]:
    """Warm each variant up, then ``repeats`` rounds of one window of each in turn.

    Returns the variants timed: one after the first whose warm-up raises (e.g. out of
    memory) is reported and left out; the first (the reference) must run.
    """
    timed = []
    for i, b in enumerate(built):
        b.windows = []
        try:
            run_steps(b, batch, max(warmup, 1))
        except Exception as e:  # noqa: BLE001
            if i == 0:
                raise
            print(f"FAILED variant {b.variant.name}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}")
            continue
        timed.append(b)
    for _ in range(repeats):
        for b in timed:
            b.windows.append(run_steps(b, batch, steps))
    for b in timed:
        if not bool(b.metrics["finite"]):
            raise RuntimeError(f"variant {b.variant.name!r}: the step produced non-finite values")
    return timed


def combination(built: list[Built]) -> Variant | None:
    """The reference with every lever of the variants that beat it, or None if none did."""
    ref = built[0]
    chosen: dict[str, tuple[float, object]] = {}
    options: set[str] = set()
    for b in built[1:]:
        diff = {k for k in VARIANT_KEYS if b.variant.key(k) != ref.variant.key(k)}
        if not diff or diff - set(LEVER_KEYS) or b.step_s >= ref.step_s:
            continue
        options |= set(b.variant.settings.xla_option)
        for k in diff - {"xla_option"}:
            if k not in chosen or b.step_s < chosen[k][0]:
                chosen[k] = (b.step_s, getattr(b.variant.settings, k))
    if not chosen and not options:
        return None
    settings = argparse.Namespace(**vars(ref.variant.settings))
    for k, (_, value) in chosen.items():
        setattr(settings, k, value)
    settings.xla_option = sorted(options | set(settings.xla_option))
    return Variant("combined", settings)
