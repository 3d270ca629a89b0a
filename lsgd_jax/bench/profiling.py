"""Profiling helpers for the benchmarks: FLOPs, the card's peak, and a trace's top ops.

``profile`` traces a few calls of a compiled step with ``jax.profiler`` and reads the
resulting XSpace with ``jax.profiler.ProfileData``: on a GPU the device plane's per-op
events (each kernel names its HLO op), on a CPU the host threads' XLA op events.
No TensorBoard or profiler plugin is needed.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax

# Dense bf16 matrix peak by the vendor's datasheets (SXM parts), in FLOP/s.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Profiler lines that summarise rather than time single ops.
_SUMMARY_LINES = ("XLA Modules", "Steps", "Source", "Framework", "XLA TraceMe")
# Host events that wrap or wait for the ops rather than run them (CPU traces).
_HOST_WRAPPERS = ("end:", "Threadpool", "ThunkExecutor", "Wait:", "Rendezvous")


def bf16_peak(device_kind: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in device_kind), None)


def step_flops(lowered) -> float | None:
    """FLOPs of one call of a program, from XLA's cost analysis of the lowered program
    (the compiled one's leaves out the convolutions that a GPU runs as library calls)."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def top_ops(xspace_path: str, count: int) -> tuple[list[tuple[str, int, float]], float]:
    """The ``count`` ops with the most total time in a profile, and the total (s).

    Reads the device plane's per-op line ("XLA Ops") when a GPU was traced, or
    every timed event of the host's XLA threads on a CPU.
    """
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xspace_path)
    planes = list(data.planes)
    device = [pl for pl in planes if pl.name.startswith("/device:")]
    events = []
    for plane in device[:1] or [pl for pl in planes if pl.name == "/host:CPU"]:
        lines = list(plane.lines)
        ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
        for line in ops_lines or lines:
            if line.name == "python" or line.name in _SUMMARY_LINES:
                continue
            for e in line.events:
                if e.duration_ns <= 0 or e.name.startswith(_HOST_WRAPPERS):
                    continue
                # A GPU kernel names the HLO op it runs in its "hlo_op" stat.
                hlo = dict(st for st in e.stats if st[0]).get("hlo_op") if device else None
                events.append((str(hlo or e.name), e.duration_ns))
    total = collections.Counter()
    calls = collections.Counter()
    for name, ns in events:
        total[name] += ns
        calls[name] += 1
    ranked = [(name, calls[name], ns * 1e-9) for name, ns in total.most_common(count)]
    return ranked, sum(total.values()) * 1e-9


def op_kind(name: str) -> str:
    """A coarse kind of an XLA op or kernel name, to sum a profile by.

    Checked in order: collectives before reductions ("all-reduce"), library
    convolutions by their call names (a fusion named "..._convert_..." is not one).
    """
    lowered = name.lower()
    for kind, marks in (("collective", ("all-reduce", "all_reduce", "all-gather", "nccl")),
                        ("convolution", ("cudnn", "convolution", "conv_general", "conv-",
                                         "conv.")),
                        ("matmul", ("gemm", "dot", "cublas")),
                        ("reduction", ("reduce",)), ("graph", ("command_buffer",)),
                        ("copy/transpose", ("copy", "transpose")), ("fusion", ("fusion",))):
        if any(m in lowered for m in marks):
            return kind
    return "other"


def profile(compiled, state, batch, steps: int, count: int):
    """Trace ``steps`` steps; return the state, the top ops and their total time."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {tmp}")
        ranked, busy = top_ops(paths[0], count)
    return state, ranked, busy


