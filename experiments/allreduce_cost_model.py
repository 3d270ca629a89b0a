"""Predicted all-reduce times of the paper's algorithms (section 4), table and plot.

Evaluates `lsgd_jax.collectives.costmodel` with paper-like parameters (50 Gbit/s
Ethernet between servers, 8 P100s with NVLink inside) and writes
experiments/results/allreduce_cost_model.{md,png}:

* time of ring, halving/doubling and binary blocks against message size and
  server count, and the halving/doubling speedup over ring;
* the ResNet-50 case: ~100 MB of gradients against a 120 ms backprop.

Usage:  python experiments/allreduce_cost_model.py [--alpha-us 20] [--gbits 50]
"""

from __future__ import annotations

import argparse
import pathlib

from lsgd_jax.collectives.costmodel import (
    P100_NVLINK,
    PAPER_ETHERNET,
    RESNET50_BACKPROP_S,
    RESNET50_PARAMETERS,
    Link,
    allreduce_time,
    bytes_per_link,
    gbit_per_s,
    hierarchical_time,
    required_bandwidth,
)

RESULTS = pathlib.Path(__file__).parent / "results"
SIZES = [2**e for e in range(8, 29)]  # 256 .. 256M elements
TABLE_SIZES = [2**10, 2**14, 2**16, 2**18, 2**20, 2**22, RESNET50_PARAMETERS]


def _elements(n: int) -> str:
    if n == RESNET50_PARAMETERS:
        return "25.6e6 (ResNet-50)"
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def speed_table(link: Link) -> list[str]:
    lines = [
        "| servers p | elements | ring (ms) | halving/doubling or binary blocks (ms) | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in (8, 16, 32, 44):
        fast = "halving_doubling" if p & (p - 1) == 0 else "binary_blocks"
        for n in TABLE_SIZES:
            ring = allreduce_time("ring", n, p, link)
            other = allreduce_time(fast, n, p, link)
            lines.append(
                f"| {p} | {_elements(n)} | {ring * 1e3:.3f} | {other * 1e3:.3f} ({fast}) "
                f"| {ring / other:.2f}x |"
            )
    return lines


def resnet_table(link: Link) -> list[str]:
    grad_bytes = 4 * RESNET50_PARAMETERS
    lines = [
        f"ResNet-50: {RESNET50_PARAMETERS:,} float32 parameters = {grad_bytes / 1e6:.1f} MB "
        f"of gradients; backprop {RESNET50_BACKPROP_S * 1e3:.0f} ms on a P100 (paper).",
        "",
        "| servers | GPUs | bytes per link (MB) | Gbit/s to send 2(p-1)/p*b within the backprop "
        "| flat halving/doubling or binary blocks (ms) | hierarchical 8 GPUs/server (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for servers in (2, 4, 8, 16, 32, 44):
        name = "halving_doubling" if servers & (servers - 1) == 0 else "binary_blocks"
        flat = allreduce_time(name, RESNET50_PARAMETERS, servers, link)
        hier = hierarchical_time(
            RESNET50_PARAMETERS, servers, 8, intra=P100_NVLINK, inter=link
        )
        lines.append(
            f"| {servers} | {8 * servers} | {bytes_per_link(name, RESNET50_PARAMETERS, servers) / 1e6:.1f} "
            f"| {required_bandwidth(grad_bytes, servers, RESNET50_BACKPROP_S) / 1e9:.1f} "
            f"| {flat * 1e3:.1f} | {hier * 1e3:.1f} |"
        )
    return lines


def plot(link: Link, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p, style in ((8, ":"), (32, "-")):
        for name, color in (("ring", "C0"), ("halving_doubling", "C1")):
            left.loglog(
                SIZES, [allreduce_time(name, n, p, link) * 1e3 for n in SIZES],
                style, color=color, label=f"{name}, p={p}",
            )
    left.loglog(
        SIZES, [allreduce_time("binary_blocks", n, 44, link) * 1e3 for n in SIZES],
        "--", color="C2", label="binary_blocks, p=44",
    )
    left.loglog(
        SIZES, [allreduce_time("ring", n, 44, link) * 1e3 for n in SIZES],
        "--", color="C0", label="ring, p=44",
    )
    left.axvline(RESNET50_PARAMETERS, color="gray", lw=0.8)
    left.annotate(" ResNet-50", (RESNET50_PARAMETERS, 0.05), xycoords=("data", "axes fraction"),
                  color="gray", rotation=90, va="bottom")
    left.set(xlabel="message size (float32 elements)", ylabel="predicted time (ms)",
             title="All-reduce time between servers")
    left.legend(fontsize=8)
    for p in (4, 8, 16, 32, 64):
        right.semilogx(
            SIZES,
            [allreduce_time("ring", n, p, link) / allreduce_time("halving_doubling", n, p, link)
             for n in SIZES],
            label=f"p={p}",
        )
    right.axhline(1.0, color="gray", lw=0.8)
    right.axvline(2**20, color="gray", lw=0.8, ls=":")
    right.set(xlabel="message size (float32 elements)", ylabel="ring time / halving-doubling time",
              title="Halving/doubling speedup over ring")
    right.legend(fontsize=8)
    fig.suptitle(
        f"alpha = {link.alpha * 1e6:.0f} us per message, {8 / link.beta / 1e9:.0f} Gbit/s per link"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha-us", type=float, default=PAPER_ETHERNET.alpha * 1e6)
    parser.add_argument("--gbits", type=float, default=8 / PAPER_ETHERNET.beta / 1e9)
    args = parser.parse_args()
    link = Link(alpha=args.alpha_us * 1e-6, beta=gbit_per_s(args.gbits))
    lines = [
        "# All-reduce cost model (alpha-beta), paper section 4",
        "",
        f"Between servers: alpha = {args.alpha_us:g} us per message, {args.gbits:g} Gbit/s per link. "
        "Produced by `python experiments/allreduce_cost_model.py`.",
        "",
        *speed_table(link),
        "",
        *resnet_table(link),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "allreduce_cost_model.md").write_text("\n".join(lines))
    plot(link, RESULTS / "allreduce_cost_model.png")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'allreduce_cost_model.md'} and .png")


if __name__ == "__main__":
    main()
