"""What made a run: the software and the machine, written into its records.

A run is bit-identical only when rerun in the same environment: the versions of
the packages below, and the CPU instruction set XLA compiles for (or the GPU and
its driver). ``describe_environment`` names them; the trainer writes the result
into ``config.json`` and the ``start`` record of ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

# The packages whose versions decide a run's numbers (or its checkpoints' format).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# The x86 and Arm features that change what XLA's CPU backend emits (vector widths,
# fused multiply-add, bf16/int8 dot instructions).
XLA_CPU_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq",
                 "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                 "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name; None for a package that is absent."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU model and those of its flags that XLA uses (Linux; else the platform's name)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
                if key == "" and flags:  # the first processor's block is enough
                    break
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(),
            "xla_flags": [f for f in XLA_CPU_FLAGS if f in flags]}


def git_commit(path: str | None = None) -> str | None:
    """The commit of the git checkout that holds ``path`` (default: this package),
    with "+dirty" when tracked files differ from it; None outside a checkout."""
    folder = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def accelerator(devices) -> dict | None:
    """The GPU (or other accelerator) kind and, for NVIDIA, the driver; None on CPUs."""
    if not devices or devices[0].platform == "cpu":
        return None
    info = {"platform": devices[0].platform, "kind": devices[0].device_kind,
            "count": len(devices)}
    try:
        with open("/proc/driver/nvidia/version") as f:
            info["driver"] = f.readline().strip()
    except OSError:
        pass
    return info


def describe_environment(devices=None) -> dict:
    """Python, the packages, the CPU, the accelerator and the git commit of the code.

    >>> env = describe_environment()
    >>> sorted(env)
    ['accelerator', 'cpu', 'git_commit', 'packages', 'python']
    """
    return {"python": platform.python_version() + f" ({sys.implementation.name})",
            "packages": package_versions(), "cpu": cpu_description(),
            "accelerator": accelerator(devices), "git_commit": git_commit()}
