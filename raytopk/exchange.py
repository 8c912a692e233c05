"""How each worker's selected gradient entries cross the network, and what each way costs.

Every exchange takes this rank's accumulated bucket ``acc`` (gradient plus
residual) and a budget of ``k`` entries (from the hook:
:func:`~raytopk.cost_model.budget`), and produces two things:

* ``out``: the sum over ranks of what the exchange used, times ``scale``,
  dense, the same on every rank (the hook passes ``1 / W``: the mean);
* ``acc`` rewritten as this rank's next residual: whatever was not used stays,
  so error feedback loses nothing. Summed over ranks,
  ``sum(residuals) + out / scale == sum(acc)``.

What the budget promises, for any worker count ``W`` and every exchange: each
rank sends about ``2 k (W - 1) / W`` entries (index and value) per bucket,
what all-gathering every rank's top ``ratio * n`` sends (``k = ratio * n * W
/ 2``, ``ratio * n`` at two workers). So a step applies up to ``W * ratio *
n`` entries, as in Deep Gradient Compression, and the wire bytes are ``W *
ratio * (value bytes + 4) / 8`` of dense DDP's (2% at ratio 0.01, fp32 values
and 2 workers; 8% at 8): two exchanges at one ratio are compared at equal
bytes. (Rounding adds at most one entry per peer and stage; the hierarchical
exchange's dense stage inside a node is outside the budget: it never crosses
a network card.) Each exchange spends the budget its own way (:func:`selected`):

1. ``allgather``: each rank selects ``2k / W`` entries (its top ``ratio *
   n``) and gathers every rank's (one ring all-gather). Exact: the update is
   the sum of every rank's selection. The simplest, and the best use of the
   bytes at two workers, where every entry a rank sends is one it chose.
2. ``sharded`` (as in Ok-Topk and SparCML): index ``i`` is owned by rank
   ``i % W``. Each rank selects ``s = 2k / (capacity_factor + keep_factor)``
   entries and sends them to their owners in one ``all_to_all_single`` with
   ``capacity_factor * s / W`` slots per destination (no round trip to agree
   on sizes, on gloo or NCCL); owners sum exactly and keep the largest
   ``keep_factor * s / W`` sums of their shard, and one equal-size
   ``all_gather`` gives everyone the update: a global top-``keep_factor * s``
   of the summed selections. Entries beyond a destination's slots, or that
   their owner did not keep, stay in the sender's residual.
3. ``hierarchical`` (two levels, as in HiTopKComm/MSTopK): ranks on one node
   reduce-scatter their dense ``acc`` over the fast local link, each local rank
   spends ``k / L`` of the budget on its shard with its peers on the other
   nodes (all-gather or sharded), and a local all-gather of the (sparse)
   results puts the update together. Only that middle stage crosses the
   node's network card.

:mod:`raytopk.cost_model` (torch-free) models the bytes and alpha-beta time
of each, and of dense DDP, for any worker count without starting a process;
its :func:`~raytopk.cost_model.choose` is ``exchange="auto"``, the same on every rank.

Stages that need the previous stage's result wait for it inside the hook,
never in a future callback: gloo matches collectives by the order they were
launched in, and callbacks run on other threads.
"""

import math
import os
import time
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from raytopk import kernels
from raytopk.compression import index_dtype, pack, select_topk, unpack
from raytopk.cost_model import (
    ALGORITHMS,
    EXCHANGES,
    KEEP_FACTOR,
    Cost,
    Layout,
    Link,
    choose,
    cost,
    dense_allreduce_bytes,
    dense_network_bytes,
    inner_choice,
    selected,
    sharded_counts,
)
from raytopk.devices import on_host

# The cost model's names stay importable from here, where the exchanges they describe run.
__all__ = [
    "EXCHANGES",
    "ALGORITHMS",
    "KEEP_FACTOR",
    "Link",
    "Layout",
    "Cost",
    "cost",
    "choose",
    "selected",
    "sharded_counts",
    "dense_allreduce_bytes",
    "dense_network_bytes",
    "finite_at",
    "node_layout",
    "Exchanger",
    "allgather",
    "sharded",
    "completed",
]

# One buffer from every rank into one tensor: torch 2.14's name, all_gather_into_tensor in older releases (such as the
# 2.11 of some GPU images, which benchmarks/gpu_check.sh runs on as it finds them).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SENTINEL = -1  # an index slot that carries nothing (padding to a fixed size; fits int32 and int64 indices)


# -- the node layout -------------------------------------------------------------------


def node_layout(group, local_world_size: Optional[int] = None) -> Tuple[Layout, Optional[str]]:
    """This group's :class:`Layout`, from ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by torchrun and Ray Train).

    ``local_world_size`` overrides the environment: ranks ``0 .. L-1`` of the
    group are one node, the next ``L`` the next, and so on.

    A collective (one tiny all-gather): every rank gets the same answer, and
    an uneven layout (nodes with different rank counts, or ranks not numbered
    node by node) is seen by all. Returns ``(layout, why_flat)``: an uneven or
    unknown layout counts as one rank per node, and ``why_flat`` says why.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if local_world_size is not None:
        local_rank, local_size = rank % local_world_size, local_world_size
    else:
        local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    mine = torch.tensor([local_rank, local_size], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    pairs = [tuple(int(v) for v in t.tolist()) for t in everyone]
    sizes = {size for _, size in pairs}
    if len(sizes) != 1:
        return Layout(world_size, 1), f"nodes hold different numbers of ranks (LOCAL_WORLD_SIZE {sorted(sizes)})"
    local = sizes.pop()
    if local < 1 or world_size % local or any(lr != r % local for r, (lr, _) in enumerate(pairs)):
        return Layout(world_size, 1), f"ranks are not numbered node by node with {local} per node"
    return Layout(world_size, local), None


# -- the exchanges ---------------------------------------------------------------------
# Each returns (future, bytes sent by this rank). The future's value is
# (out, cleared, touched): ``out`` holds the sum over ranks (times ``scale``),
# ``cleared`` the positions where this rank's contribution was used (momentum
# factor masking; the sharded exchange gives a bool mask of them), ``touched``
# every position the update may hold (repeats allowed): ``out`` is zero
# everywhere else, so checking ``out[touched]`` checks all of it. Every size is
# known before the data arrive, so a GPU's host never waits to learn one
# (:mod:`raytopk.devices`).


class Exchanged(NamedTuple):
    """What an exchange of one bucket returns, whichever algorithms ran (:meth:`Exchanger.exchange` and ``run``).

    ``future`` gives ``(out, cleared, touched)`` (above) once the update is there.
    """

    future: torch.futures.Future
    sent: float  # bytes this rank put on the wire
    network: float  # of them, this rank's share of what crossed its node's network card
    algorithms: List[str]  # the algorithm of each group exchanged


def _unpack_all(rows: torch.Tensor, count: int, numel: int, value_dtype):
    """Every peer's :func:`~raytopk.compression.pack`-ed ``count`` entries (one row each), concatenated:
    ``(values, indices)``."""
    split = count * index_dtype(numel).itemsize
    return rows[:, split:].reshape(-1).view(value_dtype), rows[:, :split].reshape(-1).view(index_dtype(numel))


def _gather(
    payload: torch.Tensor,
    group,
    world_size: int,
    finish: Callable,
    on_decoded: Optional[Callable[[float], None]] = None,
) -> torch.futures.Future:
    """Start an all-gather of equal-size ``payload`` buffers; the future of ``finish(rows)``, every rank's buffer as a
    row.

    When the collective fails (a peer died mid-exchange), the future carries
    gloo's error, and ``finish`` never reads the unfilled buffers.
    ``on_decoded`` receives the CPU seconds ``finish`` took on this thread (the hook counts them).
    """
    gathered = payload.new_empty(world_size * payload.numel())
    staged = _staged(payload, group)
    if staged:
        host = torch.empty(gathered.numel(), dtype=gathered.dtype, device="cpu", pin_memory=True)
        work = _all_gather_single(host, payload.cpu(), group=group, async_op=True)
    else:
        work = _all_gather_single(gathered, payload, group=group, async_op=True)
    rows = gathered.view(world_size, -1)

    def gathered_then_finish(fut: torch.futures.Future):
        fut.value()  # raises the collective's error, if any
        if staged:
            gathered.copy_(host)
        started = time.thread_time()
        result = finish(rows)
        if on_decoded is not None:
            on_decoded(time.thread_time() - started)
        return result

    return work.get_future().then(gathered_then_finish)


def _staged(tensor: torch.Tensor, group) -> bool:
    """Whether a collective of ``tensor`` goes through host memory: CUDA tensors on a gloo group.

    Several ranks that share one GPU (as tests and a one-GPU machine run them)
    need gloo, since NCCL refuses two ranks on a device; gloo's collectives
    take CPU tensors everywhere, so raytopk copies CUDA tensors to pinned host
    memory and back there. On NCCL nothing is staged.
    """
    return tensor.is_cuda and dist.get_backend(group) == "gloo"


def _all_to_all(
    output: torch.Tensor, tensor: torch.Tensor, group, output_split_sizes=None, input_split_sizes=None
) -> None:
    """``all_to_all_single``, waited for (its caller's next stage needs it), staged through the host on gloo with
    CUDA."""
    if not _staged(tensor, group):
        dist.all_to_all_single(output, tensor, output_split_sizes, input_split_sizes, group=group, async_op=True).wait()
        return
    host = torch.empty(output.numel(), dtype=output.dtype, device="cpu", pin_memory=True)
    dist.all_to_all_single(host, tensor.cpu(), output_split_sizes, input_split_sizes, group=group, async_op=True).wait()
    output.copy_(host)


def allgather(
    acc: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    value_dtype,
    group,
    out: torch.Tensor,
    positions: Optional[Callable] = None,
    scale: float = 1.0,
    on_decoded: Optional[Callable[[float], None]] = None,
    zeroed: bool = False,
):
    """Every rank's ``k`` entries to every rank; ``out`` is their sum, exact.

    ``values`` may run past ``indices``: the extra values travel bare, at the
    positions ``positions(indices)`` appends (entries sent dense). This
    rank's residual keeps only the rounding of what it sent. ``zeroed``: ``out``
    is zero already (the hook zeroed it as it accumulated), so the decoding
    only adds. Float32 entries at their own positions decode through raytopk's
    C kernels (:mod:`raytopk.kernels`), where they are built: every peer in one call.
    """
    world_size = dist.get_world_size(group)
    k, numel = len(indices), acc.numel()
    fused = positions is None and value_dtype == torch.float32 and kernels.usable(acc, out, indices)
    positions = positions or _as_positions
    payload = pack(values, indices, value_dtype)

    def sum_peers(rows):
        if not zeroed:
            out.zero_()
        if fused:
            kernels.clear_at(acc, indices)
            return out, positions(indices), kernels.scatter_add_rows(out, rows, k, scale)
        cleared = positions(indices)
        acc.index_copy_(0, cleared, values - unpack(payload, k, numel, value_dtype)[0].to(values.dtype))
        all_values, all_indices = _unpack_all(rows, k, numel, value_dtype)
        if positions is _as_positions:  # one launch, not one per peer
            touched = all_indices.long()
        else:
            touched = torch.cat([positions(peer_indices) for peer_indices in all_indices.view(world_size, k)])
        out.index_add_(0, touched, all_values.to(out.dtype), alpha=scale)
        return out, cleared, touched

    return _gather(payload, group, world_size, sum_peers, on_decoded), (world_size - 1) * payload.numel()


def finite_at(out: torch.Tensor, touched: torch.Tensor):
    """Whether ``out`` is finite at every position in ``touched`` (an exchange's update is zero elsewhere).

    A ``bool`` on the CPU; elsewhere a 0-dim bool tensor on the device:
    reading it on the host would wait for every kernel queued before it, and
    the hook calls this while the backward pass is still launching its own.
    """
    if touched.dtype == torch.int32 and kernels.usable(out, touched):
        return kernels.finite_at(out, touched)
    finite = torch.isfinite(out.index_select(0, touched)).all()
    return bool(finite) if on_host(out) else finite


def _route(indices: torch.Tensor, values: torch.Tensor, owners: int, capacity: int) -> torch.Tensor:
    """Each entry's slot: ``owner * capacity + place`` among its owner's ``capacity`` largest magnitudes, or
    ``owners * capacity`` (one past the last slot) for an entry that does not fit.

    Usually every owner's entries fit (the capacity has headroom, and
    interleaved ownership spreads indices evenly): on the CPU, which sees that
    at no cost, one sort by owner places them. Otherwise, and always on a
    device (where seeing it would make the host wait), entries are ranked by
    magnitude first. Either way the same entries fit.
    """
    owner = indices.long() % owners
    if on_host(indices) and int(torch.bincount(owner, minlength=owners).max()) <= capacity:
        order = torch.arange(len(indices), device=indices.device)
    else:
        order = torch.sort(values.abs(), descending=True, stable=True).indices
    by_owner = torch.sort(owner[order], stable=True)
    order, owner = order[by_owner.indices], by_owner.values
    first = torch.searchsorted(owner, torch.arange(owners, device=owner.device))  # each owner's first place
    place = torch.arange(len(order), device=order.device) - first[owner]
    slots = torch.where(place < capacity, owner * capacity + place, owners * capacity)
    return torch.empty_like(slots).index_copy_(0, order, slots)


def _owner_sums(indices: torch.Tensor, values: torch.Tensor, dtype):
    """Every distinct index among ``indices`` and the exact sum of ``values`` at each, in fixed-size tensors.

    Returns ``(distinct, sums)`` as long as ``indices``: the distinct indices in
    ascending order, then ``_SENTINEL`` (sum 0) in the rest; a sentinel among
    ``indices`` (an empty slot, value 0) sums to a sentinel entry. The size is
    fixed so that the host never waits to learn how many there are
    (``torch.unique``'s size would). Each sum adds its values in their order in
    ``indices``.
    """
    ordered, order = torch.sort(indices.long(), stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    entry = torch.cumsum(starts, 0) - 1  # which distinct index each sorted entry is
    distinct = torch.full_like(ordered, _SENTINEL).scatter_(0, entry, ordered)  # a group's entries write one value
    sums = torch.zeros(len(indices), dtype=dtype, device=values.device).index_add_(0, entry, values[order].to(dtype))
    return distinct, sums


def _real_entries(values: torch.Tensor, indices: torch.Tensor):
    """Gathered entries (as :func:`_unpack_all` gives them) with each sentinel replaced by a copy of the first real
    one: ``(positions as int64, values)``. The sizes stay fixed (the host need not count the real entries), and
    writing the result (``out[positions] = values``) writes the real entries alone, one of them again. Some entry is
    always real."""
    real = indices != _SENTINEL
    first = torch.argmax(real.to(torch.uint8)).reshape(1)  # the first real entry (a 0-dim index would be read)
    return torch.where(real, indices, indices[first]).long(), torch.where(real, values, values[first])


def sharded(
    acc: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    value_dtype,
    group,
    out: torch.Tensor,
    capacity: int,
    keep: int,
    scale: float = 1.0,
    on_decoded: Optional[Callable[[float], None]] = None,
):
    """Entries to their index's owner (``i % W``), owners sum and keep ``keep`` each, then one all-gather.

    Algorithm, on each of ``W`` ranks:

    1. Route: the ``capacity`` largest entries for each owner go into its
       slots (unused slots carry a sentinel index). One ``all_to_all_single``
       with equal splits delivers them (waited for here: stage 2 needs it).
    2. Owners sum the entries they received per index, exactly, and keep the
       ``keep`` largest sums. Their rounding to ``value_dtype`` stays in the
       owner's residual.
    3. One equal-size ``all_gather`` of the kept entries; each rank adds them
       into ``out`` (owners are disjoint, so no index arrives twice) and clears
       its residual only where it sent an entry that was kept.

    Returns the future of ``(out, cleared, touched)`` and the bytes this rank sent.
    """
    world_size, numel = dist.get_world_size(group), acc.numel()
    idx_dtype, slots = index_dtype(numel), world_size * capacity
    # Stage 1 (an entry that does not fit goes to a spare slot past the last, which is not sent)
    slot = _route(indices, values, world_size, capacity)
    send_indices = torch.full((slots + 1,), _SENTINEL, dtype=idx_dtype, device=acc.device)
    send_values = torch.zeros(slots + 1, dtype=value_dtype, device=acc.device)
    send_indices[slot] = indices.to(idx_dtype)
    send_values[slot] = values.to(value_dtype)
    rows = [t[:slots].view(torch.uint8).view(world_size, -1) for t in (send_indices, send_values)]
    send = torch.cat(rows, 1).reshape(-1)
    received = torch.empty_like(send)
    _all_to_all(received, send, group)
    received = received.view(world_size, -1)
    split = capacity * idx_dtype.itemsize
    got_indices = received[:, :split].reshape(-1).view(idx_dtype)  # flat first: one row's slice keeps its stride
    got_values = received[:, split:].reshape(-1).view(value_dtype)

    # Stage 2 (sizes stay fixed: sentinel sums rank below every real one and carry nothing)
    distinct, sums = _owner_sums(got_indices, got_values, acc.dtype)
    real = distinct != _SENTINEL
    top = torch.topk(torch.where(real, sums.abs(), -1), min(keep, slots), sorted=False).indices
    distinct, sums, real = distinct[top], sums[top], real[top]
    keep_indices = torch.full((keep,), _SENTINEL, dtype=idx_dtype, device=acc.device)
    keep_values = torch.zeros(keep, dtype=value_dtype, device=acc.device)
    keep_indices[: len(top)] = distinct.to(idx_dtype)
    keep_values[: len(top)] = sums.to(value_dtype)
    # The owner's rounding to value_dtype stays in its residual (adding -0.0 changes nothing, not even a -0.0).
    owner_rounding = (torch.where(real, distinct, 0), torch.where(real, sums - keep_values[: len(top)].to(sums), -0.0))
    positions, sent = indices.long(), slot < slots
    leftover = values - values.to(value_dtype).to(values.dtype)
    payload = pack(keep_values, keep_indices, value_dtype)

    def apply_kept(gathered):
        update_positions, update = _real_entries(*_unpack_all(gathered, keep, numel, value_dtype))
        out.zero_()
        out[update_positions] = update.to(out.dtype) * scale  # owners are disjoint: a repeat is a copy
        kept_anywhere = torch.zeros(numel, dtype=torch.bool, device=out.device)
        kept_anywhere[update_positions] = True
        used = kept_anywhere[positions] & sent
        acc[positions] = torch.where(used, leftover, acc[positions])
        acc.index_add_(0, *owner_rounding)
        cleared = kept_anywhere.zero_()  # its buffer, reused
        cleared[positions] = used
        return out, cleared, update_positions

    sent_bytes = (world_size - 1) * (send.numel() // world_size + payload.numel())
    return _gather(payload, group, world_size, apply_kept, on_decoded), sent_bytes


class Exchanger:
    """The exchange a :class:`~raytopk.hook.TopKState` uses, with the process groups it needs, built once.

    Every exchange reads the node layout (:func:`node_layout`), which splits
    the bytes sent into those that stay on a node and those that cross its
    network card (an unknown or uneven layout counts every byte as crossing).
    ``auto`` and ``hierarchical`` with several nodes of several ranks build two
    subgroups on each rank: the ranks of its node, and the ranks with its local
    rank on every node.
    """

    def __init__(
        self,
        exchange: str,
        group,
        link: Link,
        capacity_factor: float,
        local_world_size: Optional[int] = None,
        on_decoded: Optional[Callable[[float], None]] = None,
        keep_factor: float = KEEP_FACTOR,
    ):
        self.algorithm, self.group, self.link = exchange, group, link  # algorithm: one by name, or "auto"
        self.capacity_factor, self.keep_factor = capacity_factor, keep_factor
        self.on_decoded = on_decoded  # receives the CPU seconds each gather's decoding took
        self.world_size = dist.get_world_size(group)
        self.layout = Layout(self.world_size, 1)
        if self.world_size > 1:
            self.layout, why_flat = node_layout(group, local_world_size)
            if exchange == "hierarchical" and why_flat:
                raise ValueError(
                    "exchange='hierarchical' needs the same number of ranks on every node, numbered node by node: "
                    f"{why_flat}"
                )
        local, nodes = self.layout.local_world_size, self.layout.nodes
        self.intra = self.group if nodes == 1 else None
        self.inter = self.group if local == 1 else None
        if local > 1 and nodes > 1 and exchange in ("auto", "hierarchical"):
            ranks = dist.get_process_group_ranks(group)
            node, local_rank = divmod(dist.get_rank(group), local)
            self.intra = dist.new_group([ranks[node * local + i] for i in range(local)], use_local_synchronization=True)
            self.inter = dist.new_group(
                [ranks[n * local + local_rank] for n in range(nodes)], use_local_synchronization=True
            )

    def pick(self, numel: int, k: int, value_bytes: int) -> str:
        """The algorithm for one group of ``numel`` entries with ``k`` selected (``auto`` decides here)."""
        if self.algorithm != "auto":
            return self.algorithm
        return choose(
            self.layout, numel, k, value_bytes, self.link, self.capacity_factor, self.keep_factor
        )  # cached by shape

    def selected(self, algorithm: str, k: int) -> int:
        """Entries this rank selects to spend a budget of ``k`` by a flat ``algorithm`` over the whole group."""
        return selected(algorithm, k, self.world_size, self.capacity_factor, self.keep_factor)

    def network_bytes(self, algorithm: str, numel: int, k: int, value_bytes: int, sent: float) -> float:
        """This rank's share of the ``sent`` bytes of one exchange that crossed its node's network card (see
        :class:`Cost`)."""
        if self.layout.nodes == 1:
            return 0.0
        if algorithm == "allgather":  # one ring: any payload, per-layer and dense parts included
            return sent * self.layout.nodes / self.world_size
        return cost(
            algorithm,
            self.layout,
            numel,
            k,
            value_bytes,
            link=self.link,
            capacity_factor=self.capacity_factor,
            keep_factor=self.keep_factor,
        ).network_bytes

    def dense_network_bytes(self, nbytes: float) -> float:
        """This rank's share of what DDP's ring allreduce of ``nbytes`` sends across node cards."""
        return dense_network_bytes(nbytes, self.layout)

    def exchange(self, memory, buffer: torch.Tensor, ks: List[int], value_dtype, scale: float, momentum: float):
        """Accumulate one bucket (``memory``, a :class:`~raytopk.residuals.BucketMemory`: gradient in ``buffer`` plus
        residual) and exchange it with budgets ``ks``, one per group of its
        :class:`~raytopk.residuals.Selection`: the algorithm for each group is
        chosen here, and the update (times ``scale``) lands in ``buffer``.

        All-gather takes every selection (per-layer, dense parameters, the
        saved groups of a resumed step) in one collective, with accumulation
        and selection fused where it can. Sharded and hierarchical route by
        position in the bucket, so on the first step after a resume each saved
        group is exchanged on its own, as the bucket it was in the
        uninterrupted run.
        """
        selection, value_bytes = memory.selection, value_dtype.itemsize
        picked = [self.pick(size, k, value_bytes) for size, k in zip(selection.sizes, ks)]
        if all(name == "allgather" for name in picked):
            chosen = [self.selected("allgather", k) for k in ks]
            acc, values, indices = memory.accumulate_select(buffer, momentum, chosen)
            positions = selection.positions if len(selection.dense) else None
            future, sent = allgather(
                acc, values, indices, value_dtype, self.group, buffer, positions, scale, self.on_decoded, zeroed=True
            )
            network = self.network_bytes("allgather", buffer.numel(), sum(ks), value_bytes, sent)
            return Exchanged(future, sent, network, picked)
        acc = memory.accumulate(buffer, momentum)
        if selection.groups is None:
            return self.run(picked[0], acc, ks[0], value_dtype, buffer, scale)
        cleared, touched, sent, network = [], [], 0, 0.0
        for group, k, name in zip(selection.groups, ks, picked):
            part, part_out = acc[group], torch.zeros(len(group), dtype=buffer.dtype, device=buffer.device)
            result = self.run(name, part, k, value_dtype, part_out, scale)
            _, part_cleared, part_touched = result.future.wait()
            acc[group], buffer[group] = part, part_out
            cleared.append(group[part_cleared])
            touched.append(group[part_touched])
            sent, network = sent + result.sent, network + result.network
        return Exchanged(completed(buffer, torch.cat(cleared), torch.cat(touched)), sent, network, picked)

    def run(self, algorithm: str, acc: torch.Tensor, k: int, value_dtype, out: torch.Tensor, scale: float = 1.0):
        """Exchange all of ``acc`` by ``algorithm`` with a budget of ``k``; the update (times ``scale``) goes to
        ``out``."""
        if algorithm == "allgather":
            values, indices = select_topk(acc, self.selected(algorithm, k))
            future, sent = allgather(
                acc, values, indices, value_dtype, self.group, out, scale=scale, on_decoded=self.on_decoded
            )
        elif algorithm == "sharded":
            chosen = self.selected(algorithm, k)
            values, indices = select_topk(acc, chosen)
            capacity, keep = sharded_counts(chosen, self.world_size, self.capacity_factor, self.keep_factor)
            future, sent = sharded(
                acc, values, indices, value_dtype, self.group, out, capacity, keep, scale, self.on_decoded
            )
        else:
            future, sent = self._hierarchical(acc, k, value_dtype, out, scale)
        network = self.network_bytes(algorithm, acc.numel(), k, value_dtype.itemsize, sent)
        return Exchanged(future, sent, network, [algorithm])

    def _hierarchical(self, acc: torch.Tensor, k: int, value_dtype, out: torch.Tensor, scale: float):
        """Two levels: dense reduce-scatter on the node, sparse across nodes, sparse all-gather on the node.

        Algorithm, for local rank ``j`` of ``L`` on each of ``N`` nodes:

        1. Reduce-scatter ``acc`` on the node (an ``all_to_all_single`` of
           shards, summed in rank order): ``j`` holds its node's sum of shard ``j``.
        2. Spend ``ceil(k / L)`` of the budget on that sum, with the ``j``-th
           rank of every other node (all-gather or sharded, whichever the cost
           model says is faster for ``N`` ranks, each selecting as
           :func:`selected` says).
        3. All-gather the shard's update on the node (the positions step 2
           touched and their sums, in ``acc``'s dtype so nothing is rounded
           again) and put every shard's in place.

        Rank ``j`` becomes the only keeper of shard ``j``: its residual is zero
        outside the shard and, inside, the node's sum minus what step 2 used.
        """
        local, numel = self.layout.local_world_size, acc.numel()
        shard = math.ceil(numel / local)
        bounds = [(min(j * shard, numel), min((j + 1) * shard, numel)) for j in range(local)]
        start, end = bounds[dist.get_rank(self.intra) if local > 1 else 0]
        # Step 1
        node_sum, sent = self._sum_on_node(acc, bounds, start, end)
        # Step 2
        shard_k = math.ceil(k / local)
        entry = value_dtype.itemsize + index_dtype(numel).itemsize
        inner, _, result_entries = inner_choice(
            self.layout.nodes, shard_k, entry, self.link, self.capacity_factor, self.keep_factor, local
        )
        node_out = torch.zeros_like(node_sum)
        cleared = touched = torch.empty(0, dtype=torch.long, device=acc.device)
        if end > start:  # every rank of the stage across nodes has the same shard: all skip it or none
            cleared, touched, inner_sent = self._across_nodes(inner, node_sum, shard_k, value_dtype, node_out)
            sent += inner_sent
        acc.zero_()
        acc[start:end] = node_sum
        if local == 1:
            torch.mul(node_out, scale, out=out)
            return completed(out, cleared, touched), sent
        # Step 3
        future, gather_sent = self._gather_on_node(node_out, touched, start, result_entries, numel, out, scale)
        return future, sent + gather_sent

    def _sum_on_node(self, acc: torch.Tensor, bounds: list, start: int, end: int):
        """Step 1 of :meth:`_hierarchical`: this rank's shard ``acc[start:end]`` summed over its node (``bounds``: every
        local rank's shard), and the bytes sent. One rank per node: ``acc`` itself (a copy), nothing sent."""
        local = self.layout.local_world_size
        if local == 1:
            return acc.clone(), 0
        received = torch.empty(local * (end - start), dtype=acc.dtype, device=acc.device)
        _all_to_all(received, acc, self.intra, [end - start] * local, [e - s for s, e in bounds])
        return received.view(local, end - start).sum(0), (acc.numel() - (end - start)) * acc.element_size()

    def _across_nodes(self, inner: str, node_sum: torch.Tensor, shard_k: int, value_dtype, node_out: torch.Tensor):
        """Step 2 of :meth:`_hierarchical`: exchange ``node_sum`` by ``inner`` with the same local rank on every node,
        waited for. ``node_out`` receives the update and ``node_sum`` becomes the residual, as in any exchange;
        returns ``(cleared, touched, bytes sent)``."""
        nodes = self.layout.nodes
        chosen = shard_k if inner == "none" else selected(inner, shard_k, nodes, self.capacity_factor, self.keep_factor)
        values, indices = select_topk(node_sum, min(chosen, node_sum.numel()))
        if inner == "none":
            future, sent = _local_only(node_sum, values, indices, value_dtype, node_out)
        elif inner == "allgather":
            future, sent = allgather(
                node_sum, values, indices, value_dtype, self.inter, node_out, on_decoded=self.on_decoded
            )
        else:
            capacity, keep = sharded_counts(chosen, nodes, self.capacity_factor, self.keep_factor)
            future, sent = sharded(
                node_sum, values, indices, value_dtype, self.inter, node_out, capacity, keep, on_decoded=self.on_decoded
            )
        _, cleared, touched = future.wait()
        return cleared, touched, sent

    def _gather_on_node(
        self, node_out: torch.Tensor, touched: torch.Tensor, start: int, entries: int, numel: int, out, scale: float
    ):
        """Step 3 of :meth:`_hierarchical`: all-gather each local rank's update of its shard (``node_out`` at the
        ``touched`` positions, padded to ``entries``) and put them in place in ``out``, times ``scale``. Returns the
        future of ``(out, positions, positions)`` and the bytes sent."""
        local = self.layout.local_world_size
        result_indices = torch.full((entries,), _SENTINEL, dtype=index_dtype(numel), device=node_out.device)
        result_values = torch.zeros(entries, dtype=node_out.dtype, device=node_out.device)
        result_indices[: len(touched)] = touched + start
        result_values[: len(touched)] = node_out[touched]
        payload = pack(result_values, result_indices, node_out.dtype)

        def put_together(gathered):
            positions, update = _real_entries(*_unpack_all(gathered, entries, numel, node_out.dtype))
            out.zero_()
            out[positions] = update * scale  # a position touched twice carries the same sum twice
            return out, positions, positions

        return _gather(payload, self.intra, local, put_together, self.on_decoded), (local - 1) * payload.numel()


def _as_positions(indices: torch.Tensor) -> torch.Tensor:
    return indices.long()


def completed(out: torch.Tensor, cleared: torch.Tensor, touched) -> torch.futures.Future:
    """An exchange's result that is already there (a stage that waited, or nothing to send), as a future."""
    future = torch.futures.Future()
    future.set_result((out, cleared, touched))
    return future


def _local_only(acc, values, indices, value_dtype, out):
    """The stage across nodes when there is one node: nothing to send; the selected entries are the update."""
    positions = indices.long()
    rounded = values.to(value_dtype).to(acc.dtype)
    out[positions] = rounded
    acc[positions] = values - rounded
    return completed(out, positions, positions), 0
