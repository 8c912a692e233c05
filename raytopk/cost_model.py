"""What each exchange costs, without starting a process: bytes per rank, bytes across node cards, alpha-beta time.

Torch-free, so benchmarks, docs and the job config can import it. ``ratio``
is each worker's top share, as in Deep Gradient Compression: a bucket's
budget is ``k`` entries (:func:`budget`), what all-gathering every rank's top
``ratio * n`` sends, and every exchange spends it so that each rank sends
about ``2 k (W - 1) / W`` entries (:func:`selected`);
:func:`cost` models one bucket's exchange for any worker count and node
layout, and :func:`choose` is ``exchange="auto"``: the fastest of the
exchanges measured not to cost accuracy for the layout
(:func:`accurate_exchanges`). :mod:`raytopk.exchange` runs them.
"""

import functools
import math
from dataclasses import dataclass
from typing import Tuple

__all__ = [
    "EXCHANGES",
    "ALGORITHMS",
    "ALLGATHER_MAX_RANKS",
    "KEEP_FACTOR",
    "Link",
    "Layout",
    "Cost",
    "budget",
    "cost",
    "choose",
    "accurate_exchanges",
    "selected",
    "sharded_counts",
    "dense_allreduce_bytes",
    "dense_network_bytes",
    "index_bytes",
    "inner_choice",
]

EXCHANGES = ("auto", "allgather", "sharded", "hierarchical")
# What the cost model knows: the exchanges, and dense DDP in fp32 and fp16 for comparison.
ALGORITHMS = ("dense", "dense_fp16", "allgather", "sharded", "hierarchical")
# Flat groups of at most this many ranks exchange by all-gather under auto, larger ones by sharded (accurate_exchanges).
ALLGATHER_MAX_RANKS = 4
# Sums each sharded owner keeps, as a multiple of its share ``selected / W`` (measured: docs/benchmarks.md).
KEEP_FACTOR = 3.0


def index_bytes(numel: int) -> int:
    """Bytes of one sent index in a bucket of ``numel``: int32 when every position fits in 31 bits, else int64."""
    return 4 if numel <= 2**31 - 1 else 8


@dataclass(frozen=True)
class Link:
    """Alpha-beta figures of the network: latency per message and bandwidth, between nodes and inside one.

    The defaults describe the slow network raytopk is for: 1 Gbit/s and 50 us
    per message between nodes, as is common between cloud nodes, and 100 Gbit/s
    and 5 us between ranks of one node. Set them to your cluster's to make
    ``auto`` (and :func:`cost`'s seconds) match it: on a faster network,
    latency weighs more and ``auto`` prefers fewer messages (all-gather) for
    small buckets.
    """

    inter_gbps: float = 1.0
    inter_latency_us: float = 50.0
    intra_gbps: float = 100.0
    intra_latency_us: float = 5.0

    def __post_init__(self):
        for name in ("inter_gbps", "inter_latency_us", "intra_gbps", "intra_latency_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"Link {name} must be a finite number >= 0, got {value!r}")
        if not self.inter_gbps or not self.intra_gbps:
            raise ValueError(
                f"Link bandwidths must be > 0, got inter_gbps={self.inter_gbps}, intra_gbps={self.intra_gbps}"
            )

    def seconds(self, messages: int, nbytes: float, inter: bool) -> float:
        """Time of ``messages`` sequential messages carrying ``nbytes`` through one link."""
        latency, gbps = (self.inter_latency_us, self.inter_gbps) if inter else (self.intra_latency_us, self.intra_gbps)
        return messages * latency * 1e-6 + nbytes * 8 / (gbps * 1e9)


@dataclass(frozen=True)
class Layout:
    """Ranks as nodes: ``world_size`` ranks, ``local_world_size`` per node, numbered node by node."""

    world_size: int
    local_world_size: int = 1

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size


@dataclass(frozen=True)
class Cost:
    """One bucket's exchange, per rank: bytes sent (all stages), alpha-beta seconds, and bytes across node cards.

    ``network_bytes`` is this rank's share of what leaves its node through the
    network card. A ring (all-gather, DDP's allreduce) visits ranks node by
    node, so each node sends one ring edge's bytes off the node, shared here
    evenly by its ranks; an all-to-all sends off the node every chunk whose
    destination is on another node. On one node it is 0.
    """

    bytes_sent: float
    seconds: float
    network_bytes: float = 0.0


def dense_allreduce_bytes(nbytes: float, world_size: int) -> float:
    """What a ring allreduce (DDP's, gloo's and NCCL's) sends per rank for a tensor of ``nbytes``."""
    return 2 * (world_size - 1) / world_size * nbytes


def dense_network_bytes(nbytes: float, layout: Layout) -> float:
    """Each rank's share of what a ring allreduce of ``nbytes`` (DDP's) sends across node cards: 0 on one node.

    The ring visits ranks node by node, so each of ``N`` nodes sends one
    edge's ``2 (W - 1) / W * nbytes`` off the node: summed over ranks,
    ``N * 2 (W - 1) / W * nbytes``.
    """
    return cost("dense", layout, nbytes, 0, element_bytes=1).network_bytes if layout.world_size > 1 else 0.0


def _ring(layout: Layout, link: Link, steps: int, per_rank: float, sharing: int = 1) -> Cost:
    """A ring collective of ``steps`` steps sending ``per_rank`` bytes from each rank.

    The ring visits ranks node by node, so each node's card carries one ring
    edge each way, and the slowest edge sets the pace. ``sharing`` rings run at
    once through the same cards.
    """
    across = layout.nodes > 1
    network = per_rank * layout.nodes / layout.world_size if across else 0.0
    return Cost(per_rank, link.seconds(steps, sharing * per_rank, inter=across), network)


def _pairwise(layout: Layout, link: Link, chunk: float, sharing: int = 1) -> Cost:
    """An all-to-all with ``chunk`` bytes from each rank to each other rank.

    Every rank of a node sends to every rank off it through the node's card:
    ``L * (W - L)`` chunks leave each node (times ``sharing`` concurrent runs).
    """
    w, local = layout.world_size, layout.local_world_size
    if layout.nodes == 1:
        return Cost((w - 1) * chunk, link.seconds(w - 1, (w - 1) * chunk, inter=False))
    seconds = link.seconds(w - 1, sharing * local * (w - local) * chunk, inter=True)
    seconds += link.seconds(0, (local - 1) * chunk, inter=False)
    return Cost((w - 1) * chunk, seconds, (w - local) * chunk)


def _plus(*costs: Cost) -> Cost:
    return Cost(*(sum(getattr(c, field) for c in costs) for field in ("bytes_sent", "seconds", "network_bytes")))


def budget(ratio: float, numel: int, world_size: int) -> int:
    """The budget ``k`` of a bucket of ``numel`` entries at ``ratio``: the bytes of all-gathering each rank's top share.

    Each of ``W`` ranks contributes its top ``r = max(1, ceil(ratio * numel))``
    entries, as in DGC and GRACE, so a step applies up to ``W * r`` entries
    whatever ``W``: the entries per sample stay those of two workers, and the
    accuracy with them (``docs/benchmarks.md`` measures 8 workers). All-gather
    sends each rank's ``r`` to the ``W - 1`` others; the budget is that many
    entries on the wire, ``2 k (W - 1) / W`` with ``k = r * W / 2`` (``r`` at
    one or two workers), which the sharded and hierarchical exchanges spend on
    a global top-k of the summed selections instead. So the bytes per rank per
    step grow like all-gather's, ``W * ratio`` of dense DDP's at fp32; per
    epoch, with a fixed batch per worker, they stay flat. At most ``numel``.
    """
    per_rank = max(1, math.ceil(ratio * numel))
    return min(numel, per_rank if world_size <= 2 else math.ceil(per_rank * world_size / 2))


def selected(
    algorithm: str, k: int, world_size: int, capacity_factor: float = 1.25, keep_factor: float = KEEP_FACTOR
) -> int:
    """Entries each rank selects so that ``algorithm`` sends about ``2 k (W - 1) / W`` entries (the budget ``k``'s
    promise).

    All-gather sends ``W - 1`` copies of its selection: ``2k / W``. Sharded
    sends ``capacity_factor + keep_factor`` times ``(W - 1) / W`` of it:
    ``2k / (capacity_factor + keep_factor)``. At least one entry, never more than ``k``.
    """
    if world_size == 1:
        return k
    if algorithm == "allgather":
        return max(1, 2 * k // world_size)
    if algorithm == "sharded":
        return max(1, min(k, math.floor(2 * k / (capacity_factor + keep_factor))))
    raise ValueError(f"selected() knows allgather and sharded, got {algorithm!r}")


def sharded_counts(
    selected: int, world_size: int, capacity_factor: float, keep_factor: float = KEEP_FACTOR
) -> Tuple[int, int]:
    """``(capacity, keep)`` of the sharded exchange for ``selected`` entries per rank: slots per destination, sums kept
    per owner."""
    return max(1, math.ceil(capacity_factor * selected / world_size)), max(
        1, math.ceil(keep_factor * selected / world_size)
    )


@functools.lru_cache(maxsize=1024)  # pure, and the hook asks the same few bucket shapes every step
def cost(
    algorithm: str,
    layout: Layout,
    numel: int,
    k: int,
    value_bytes: int = 4,
    element_bytes: int = 4,
    link: Link = Link(),
    capacity_factor: float = 1.25,
    keep_factor: float = KEEP_FACTOR,
) -> Cost:
    """Bytes per rank and alpha-beta seconds of exchanging one bucket of ``numel`` entries with a budget of ``k``.

    ``value_bytes`` is the size of a sent value (indices add 4), ``element_bytes``
    that of a dense gradient entry. A budget whose entries would cost at least
    the dense bucket goes dense, as the hook sends it. Starts no process: use it
    to project any worker count (``benchmarks/cost_model.py`` plots it up to 1,024 workers).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    w = layout.world_size
    if w == 1:
        return Cost(0, 0.0)
    entry = value_bytes + index_bytes(numel)
    if algorithm in EXCHANGES and k * entry >= numel * element_bytes:
        algorithm = "dense"
    if algorithm in ("dense", "dense_fp16"):
        nbytes = numel * (2 if algorithm == "dense_fp16" else element_bytes)
        return _ring(layout, link, 2 * (w - 1), dense_allreduce_bytes(nbytes, w))
    if algorithm != "hierarchical":
        return _flat(algorithm, layout, k, entry, link, capacity_factor, keep_factor)
    local, nodes = layout.local_world_size, layout.nodes
    shard_k = math.ceil(k / local)
    on_node = Layout(local, local)
    # Shards are ceil(numel / L) but the last; on average each rank sends (L - 1) / L of the bucket in the
    # reduce-scatter.
    scatter = _pairwise(on_node, link, numel * element_bytes / local)
    _, inner, result = inner_choice(nodes, shard_k, entry, link, capacity_factor, keep_factor, sharing=local)
    gather = _ring(on_node, link, local - 1, (local - 1) * result * (element_bytes + 4))
    return _plus(scatter, inner, gather)


def _flat(
    algorithm: str,
    layout: Layout,
    k: int,
    entry: int,
    link: Link,
    capacity_factor: float,
    keep_factor: float,
    sharing: int = 1,
) -> Cost:
    """All-gather or sharded over ``layout`` with a budget of ``k``, ``entry`` bytes per sent entry."""
    w = layout.world_size
    if w == 1:
        return Cost(0, 0.0)
    chosen = selected(algorithm, k, w, capacity_factor, keep_factor)
    if algorithm == "allgather":
        return _ring(layout, link, w - 1, (w - 1) * chosen * entry, sharing)
    capacity, keep = sharded_counts(chosen, w, capacity_factor, keep_factor)
    return _plus(
        _pairwise(layout, link, capacity * entry, sharing), _ring(layout, link, w - 1, (w - 1) * keep * entry, sharing)
    )


def inner_choice(nodes: int, k: int, entry: int, link: Link, capacity_factor: float, keep_factor: float, sharing: int):
    """The hierarchical exchange's stage across ``nodes`` (one rank each, ``sharing`` per card at once), budget ``k``.

    Returns the flat algorithm it uses ("none" on one node), its cost, and how
    many entries its result can hold.
    """
    if nodes == 1:
        return "none", Cost(0, 0.0), k
    across = Layout(nodes, 1)
    timed = [
        (_flat(name, across, k, entry, link, capacity_factor, keep_factor, sharing), i, name)
        for i, name in enumerate(accurate_exchanges(across))
    ]
    inner, _, name = min(timed, key=lambda t: (t[0].seconds, t[1]))
    chosen = selected(name, k, nodes, capacity_factor, keep_factor)
    entries = (
        nodes * chosen
        if name == "allgather"
        else nodes * sharded_counts(chosen, nodes, capacity_factor, keep_factor)[1]
    )
    return name, inner, entries


@functools.lru_cache(maxsize=1024)
def choose(
    layout: Layout,
    numel: int,
    k: int,
    value_bytes: int = 4,
    link: Link = Link(),
    capacity_factor: float = 1.25,
    keep_factor: float = KEEP_FACTOR,
) -> str:
    """The exchange with the least modelled time for this bucket (``exchange="auto"``) among :func:`accurate_exchanges`.

    Ties go to the simpler one. Deterministic: every rank passes the same
    numbers and gets the same answer.
    """
    candidates = accurate_exchanges(layout)
    timed = [
        (
            cost(
                name, layout, numel, k, value_bytes, link=link, capacity_factor=capacity_factor, keep_factor=keep_factor
            ).seconds,
            i,
            name,
        )
        for i, name in enumerate(candidates)
    ]
    return min(timed)[2]


def accurate_exchanges(layout: Layout) -> Tuple[str, ...]:
    """The exchanges ``auto`` chooses among for ``layout``: those whose measured accuracy keeps up at equal bytes.

    At one ratio every exchange sends the same bytes, so the question is
    which spends them better. All-gather spends them on each rank's own top
    share, exactly; the sharded exchange on a global top of summed
    selections, which applies fewer entries. Measured (docs/benchmarks.md):
    at 4 workers all-gather is the more accurate (sharded 0.14 points below
    at ratio 0.01, 0.23 at 0.001), at 8 the sharded exchange (0.06 above at
    0.01, 0.15 at 0.001), so flat groups of up to ``ALLGATHER_MAX_RANKS``
    ranks use all-gather and larger ones sharded. The two-level exchange,
    which sums whole nodes densely first, was more accurate than all-gather
    at 2 x 2 and 2 x 4; it needs several nodes of several ranks.
    """
    flat = ("allgather",) if layout.world_size <= ALLGATHER_MAX_RANKS else ("sharded",)
    several = layout.local_world_size > 1 and layout.nodes > 1
    return flat + (("hierarchical",) if several else ())
