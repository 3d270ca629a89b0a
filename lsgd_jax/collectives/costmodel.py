"""Alpha-beta-gamma cost model of the all-reduce algorithms (paper section 4).

A step that sends m messages of e elements in total and sums r elements
costs  m * alpha + e * s * beta + r * s * gamma  seconds (s bytes per
element): alpha is the latency of one message, beta the time per byte on one
link, gamma the time per byte summed. An algorithm is the list of steps on
its critical path, written to follow `lsgd_jax.collectives`:

    ring              2(p-1) steps of b/p bytes            (bucket algorithm)
    halving_doubling  2 log2(p) steps of b/2, b/4, ..., b/p and back
    binary_blocks     halving in the largest block, the partial sums up and
                      down the chain of smaller blocks, doubling back

Ring and halving/doubling both move 2(p-1)/p * b bytes per link; only their
number of steps differs, so halving/doubling wins where latency dominates
(small buffers, many servers) and both meet where bandwidth does. With the
paper-like `PAPER_ETHERNET` parameters this reproduces the paper's
observations: halving/doubling is clearly faster up to about a million
elements and about 3x faster than ring on 32 servers for buffers of a few
hundred thousand elements. The model has no contention or pipelining term,
so it never shows ring ahead for very large buffers; it shows them equal.
"""

from __future__ import annotations

import dataclasses
import math

from lsgd_jax.collectives.algorithms import binary_block_sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """Cost of one network level.

    Attributes:
      alpha: seconds of latency per message.
      beta: seconds per byte on one link (1 / bandwidth in bytes/s).
      gamma: seconds per byte summed.
    """

    alpha: float
    beta: float
    gamma: float = 0.0

    def __post_init__(self):
        for field in ("alpha", "beta", "gamma"):
            value = getattr(self, field)
            if not value >= 0:
                raise ValueError(f"Link.{field}={value!r} must be >= 0")


def gbit_per_s(gbits: float) -> float:
    """beta (seconds per byte) of a link of `gbits` Gbit/s."""
    return 8.0 / (gbits * 1e9)


# The paper's servers talk over 50 Gbit/s Ethernet with Gloo over TCP; alpha =
# 20 us is an assumed per-message latency for that stack (it puts the
# paper's 3x at 32 servers at a few hundred thousand elements).
PAPER_ETHERNET = Link(alpha=20e-6, beta=gbit_per_s(50))
# Inside a server the paper reduces with NCCL over NVLink (P100); ~20 GB/s per
# ring direction and 10 us per step are assumptions of the same kind.
P100_NVLINK = Link(alpha=10e-6, beta=1 / 20e9)

RESNET50_PARAMETERS = 25_557_032  # ResNet-50 (fb.resnet.torch), float32: ~102 MB
RESNET50_BACKPROP_S = 0.120  # paper: backprop of n = 32 images on one P100


@dataclasses.dataclass(frozen=True)
class Step:
    """One step on the critical path: `messages` messages carrying `elements`
    elements in total, of which the receiver sums `reduced`."""

    messages: int
    elements: float
    reduced: float


FLAT_ALGORITHMS = ("ring", "halving_doubling", "binary_blocks")


def _check(n: float, p: int) -> None:
    if not n > 0:
        raise ValueError(f"message size n={n!r} must be > 0 elements")
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"worker count p={p!r} must be a positive int")


def schedule(name: str, n: float, p: int) -> list[Step]:
    """Critical-path steps of the all-reduce `name` of n elements over p workers."""
    _check(n, p)
    if p == 1:
        return []
    if name == "ring":
        chunk = n / p
        return [Step(1, chunk, chunk)] * (p - 1) + [Step(1, chunk, 0.0)] * (p - 1)
    if name == "halving_doubling":
        if p & (p - 1):
            raise ValueError(
                f"halving_doubling needs a power-of-two p, got p={p}; "
                "use 'binary_blocks' or 'ring'"
            )
        halves = [n / 2**j for j in range(1, int(math.log2(p)) + 1)]
        return [Step(1, e, e) for e in halves] + [Step(1, e, 0.0) for e in reversed(halves)]
    if name == "binary_blocks":
        sizes = binary_block_sizes(p)
        if len(sizes) == 1:
            return schedule("halving_doubling", n, p)
        largest = schedule("halving_doubling", n, sizes[0]) if sizes[0] > 1 else []
        half = len(largest) // 2
        up, down = [], []
        for small, large in zip(sizes[1:], sizes[:-1]):
            ratio = large // small
            # One member of the smaller block sends `ratio` pieces of n/large;
            # each receiver sums one of them.
            up.append(Step(ratio, n / small, n / large))
            down.append(Step(ratio, n / small, 0.0))
        return largest[:half] + up[::-1] + down + largest[half:]
    raise ValueError(f"unknown algorithm {name!r}; valid: {list(FLAT_ALGORITHMS)}")


def bytes_per_link(name: str, n: float, p: int, itemsize: int = 4) -> float:
    """Bytes one worker sends along the critical path."""
    return sum(step.elements for step in schedule(name, n, p)) * itemsize


def allreduce_time(name: str, n: float, p: int, link: Link, itemsize: int = 4) -> float:
    """Predicted seconds for the all-reduce `name` of n elements over p workers."""
    return sum(
        step.messages * link.alpha
        + step.elements * itemsize * link.beta
        + step.reduced * itemsize * link.gamma
        for step in schedule(name, n, p)
    )


def hierarchical_time(
    n: float,
    hosts: int,
    devices_per_host: int,
    *,
    intra: Link,
    inter: Link,
    between_hosts: str = "binary_blocks",
    itemsize: int = 4,
) -> float:
    """Reduce inside each host (ring), all-reduce between hosts, broadcast inside.

    The `devices_per_host` inter-host all-reduces of n / devices_per_host
    elements run at once and share the host's network card, so each sees
    `inter.beta * devices_per_host`: a host sends 2(H-1)/H * b bytes, as in
    the paper where one buffer per server crosses the network.
    """
    _check(n, hosts)
    h = devices_per_host
    if not isinstance(h, int) or h < 1:
        raise ValueError(f"devices_per_host={h!r} must be a positive int")
    inside = allreduce_time("ring", n, h, intra, itemsize)
    shared = dataclasses.replace(inter, beta=inter.beta * h)
    between = allreduce_time(between_hosts, n / h, hosts, shared, itemsize) if hosts > 1 else 0.0
    return inside + between


def required_bandwidth(grad_bytes: float, servers: int, seconds: float) -> float:
    """Bits/s a server needs to all-reduce `grad_bytes` in `seconds`.

    Both of the paper's algorithms send 2(p-1)/p * b bytes per link; latency
    is ignored (the buffer is large). For ResNet-50 (~100 MB) hidden behind a
    120 ms backprop this is the paper's ~15 Gbit/s.
    """
    if not seconds > 0:
        raise ValueError(f"seconds={seconds!r} must be > 0")
    return 2 * (servers - 1) / servers * grad_bytes * 8 / seconds


def iteration_time(
    gpus: int,
    *,
    devices_per_host: int = 8,
    forward_s: float = RESNET50_BACKPROP_S / 2,
    backward_s: float = RESNET50_BACKPROP_S,
    grad_elements: float = RESNET50_PARAMETERS,
    buckets: int = 50,
    intra: Link = P100_NVLINK,
    inter: Link = PAPER_ETHERNET,
    between_hosts: str = "binary_blocks",
) -> float:
    """Seconds per iteration of data-parallel SGD with a fixed n images per GPU.

    Compute does not depend on the number of GPUs. Aggregation overlaps with
    backprop as in the paper (section 4: a layer's gradient is all-reduced as
    soon as it is computed): the gradients become ready in `buckets` equal
    parts spread evenly over the backward pass, and each part's all-reduce
    starts once it is ready and the previous one is done. What is left after
    the backward pass adds to the iteration. `forward_s` defaults to half the
    backward pass (an assumption: backprop costs about twice the forward
    FLOPs).
    """
    if not isinstance(gpus, int) or gpus < 1 or gpus % devices_per_host:
        raise ValueError(
            f"gpus={gpus!r} must be a positive multiple of "
            f"devices_per_host={devices_per_host}"
        )
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets={buckets!r} must be a positive int")
    per_bucket = hierarchical_time(
        grad_elements / buckets,
        gpus // devices_per_host,
        devices_per_host,
        intra=intra,
        inter=inter,
        between_hosts=between_hosts,
    )
    done = 0.0
    for i in range(1, buckets + 1):
        done = max(done, backward_s * i / buckets) + per_bucket
    return forward_s + max(backward_s, done)
