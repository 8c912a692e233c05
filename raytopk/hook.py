"""Top-k sparsification with error feedback, as a DDP communication hook.

Use it like PyTorch's PowerSGD hook::

    state = raytopk.TopKState(ratio=0.01, module=model)
    ddp_model.register_comm_hook(state, raytopk.topk_hook)

Only the selected entries cross the network, never a dense tensor; how they
cross (all-gather, sharded, or two levels across nodes) is
:mod:`raytopk.exchange`'s job. Nothing here imports Ray: any DDP program,
``torchrun`` included, can use the hook.
"""

import dataclasses
import math
import threading
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from raytopk import kernels
from raytopk.compression import VALUE_DTYPES, payload_bytes
from raytopk.cost_model import budget, dense_allreduce_bytes
from raytopk.exchange import Exchanger, finite_at
from raytopk.optim import check_optimizer
from raytopk.options import CompressionOptions, options_from
from raytopk.residuals import KINDS, ResidualStore

__all__ = ["TopKState", "topk_hook", "redistribute", "gather_state_dicts", "load_rank_state"]


class TopKState:
    r"""State of :func:`topk_hook`: the compression settings and this worker's residuals.

    Each step, every worker adds its residual (what it did not send before) to
    the gradient bucket, sends its entries of largest magnitude (its top
    ``ceil(ratio * n)``, or what sending those costs, spent by the exchange)
    and keeps the rest as its new residual. Nothing is lost,
    only delayed: this error feedback is why training converges almost as if
    the whole gradient had been sent.

    Tuning:

    1. ``ratio`` is each worker's top share, as in Deep Gradient Compression:
       each step applies up to ``W * ratio * n`` entries, so the entries per
       sample stay those of two workers as workers are added, and the
       accuracy with them. A worker sends what its top ``ratio * n`` entries
       cost to all-gather, as index and value, ``W * ratio * (value size + 4)
       / 8`` of dense fp32's bytes (2% at 0.01 and two workers, 8% at eight);
       the exchange decides how to spend it (8.). 0.01 ended within half a
       point of dense training on Fashion-MNIST at 2, 4 and 8 workers (batch
       64 each, 5 epochs); 0.001 saves ten times more and costs 1 to 2 points there.
       With a fixed batch per worker the bytes per epoch stay flat; to keep
       the bytes per step flat instead, divide ``ratio`` by ``W / 2`` (at
       the accuracy ``docs/benchmarks.md`` measures).
    2. ``start_iter`` dense iterations come first. DDP rebuilds its buckets
       after the first iteration, and dense steps at the start are cheap
       insurance, as in PowerSGD. Keep it at least 2.
    3. ``value_dtype`` ("fp32", "fp16", "bf16") sets how values travel; fp16
       cuts the payload from 8 to 6 bytes per entry. Indices are always int32
       (int64 only for buckets beyond 2**31 entries).

    Deep Gradient Compression's techniques (Lin et al., 2018), for very low
    ratios such as 0.001; each is off by default:

    4. Sparsity warm-up: ``warmup_ratio`` and ``warmup_steps``. The ratio
       starts at ``warmup_ratio`` and decays exponentially to ``ratio`` over
       the first ``warmup_steps`` compressed steps (DGC: 0.25 to 0.001 over 4
       epochs), so the early, fast-changing gradients are not held back long.
    5. Momentum correction: ``momentum``. The hook keeps each worker's SGD
       velocity ``u = momentum * u + g`` and accumulates and sparsifies ``u``
       instead of ``g``; entries it sends have their velocity cleared
       (momentum factor masking), so stale momentum does not push them again.
       The momentum is then already in what arrives: the optimizer is
       :class:`~raytopk.optim.MomentumCorrectedSGD` (``momentum`` the same; it
       gives weight decay that momentum too, as dense momentum SGD does), or
       ``torch.optim.SGD(params, lr, momentum=0)`` without weight decay.
       :meth:`check_optimizer` raises on any other optimizer.
    6. Local gradient clipping: ``clip_norm``. Each worker clips each bucket of
       its gradient to norm ``clip_norm / sqrt(W)`` before accumulating it, so
       the sum over ``W`` workers stays within ``clip_norm`` as a global clip
       would, and a burst cannot swell the residual.
    7. Per-layer selection: ``per_layer=True`` picks the top-k of each
       parameter on its own, so no layer is starved by another's larger
       gradients. Parameters that are 1-D (biases, norms) or have fewer than
       ``dense_below`` entries go dense, as their values alone (both sides
       know their positions); every rank still sends the same number of bytes.

    How entries cross the network, for many workers:

    8. ``exchange``: "allgather" sends every rank's entries to every rank, so
       each worker's traffic grows with the worker count; "sharded" routes
       entries to the rank that owns their index and keeps traffic per worker
       flat (``capacity_factor`` sizes each destination's slots, 1.25 = 25%
       headroom for uneven indices); "hierarchical" reduces densely inside each
       node first and sends sparse entries only between nodes. "auto" (the
       default) picks per bucket by :func:`raytopk.cost_model.cost` from the
       worker count, the node layout (``ranks_per_node``, else
       ``LOCAL_WORLD_SIZE`` as torchrun and Ray Train set it), the bucket and
       the link between nodes (``link_gbps``, ``link_latency_us``), among the exchanges measured to keep
       accuracy for that layout. Every exchange keeps ``ratio``'s bytes;
       all-gather spends them on each worker's own top ``ratio * n``, sharded
       on a global top-k of summed selections (its owners keep
       ``keep_factor`` times their share of the sums), which is why it is more
       accurate with many workers. What an exchange does not use stays in the residuals.
       Per-layer selection sends with "allgather".

    Memory: two residual-sized tensors per worker (twice the gradient size):
    the residual, and the ``gradient + residual`` of the step in flight, which
    becomes the next residual; momentum correction adds two more for the
    velocity. Holding both saves a copy of every bucket per step and lets a
    skipped step (non-finite values) keep the old state exactly.

    Args:
        options: the settings above, a :class:`~raytopk.CompressionOptions`
            (where each one's default and allowed values are defined); ``None``
            is its defaults.
        process_group: the group to communicate in; ``None`` means the default group.
        module: the model the DDP wraps, optional. With it, :meth:`state_dict`
            names residuals by parameter name, so a checkpoint also loads into a
            DDP with another ``bucket_cap_mb`` or a model with the same names.
            Without it (as PowerSGD's state is written), residuals are named by
            the order in which DDP first hands the parameters to the hook
            (``param0``, ``param1``, ...): its first buckets hold them in
            reverse registration order, whatever ``bucket_cap_mb``, so the same
            model repeats it. A checkpoint whose residuals do not fit the model
            (another shape, or parameters left over) is refused at the first
            step; pass ``module`` to load across models that share names.
        **changes: options by name, over ``options``: ``TopKState(ratio=0.001, module=model)``.
    """

    def __init__(
        self,
        options: Optional[CompressionOptions] = None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        module: Optional[torch.nn.Module] = None,
        **changes,
    ):
        # Compression settings, checked once (raytopk.options): what each step sends and how.
        self.options = options_from(options, **changes)
        self.process_group = process_group
        self._exchanger: Optional[Exchanger] = None
        # Buckets exchanged by each algorithm (what auto chose), counted for logs and benchmarks.
        self.algorithms: Dict[str, int] = {}
        # Error feedback: this worker's residuals, by parameter and by bucket.
        self.residuals = ResidualStore(module)
        # Step counter, advanced after the last bucket of each step.
        self.iter = 0
        # Cumulative counters, read by training loops and benchmarks.
        # network_bytes: this rank's share of what crossed its node's network card (0 on one node);
        # dense_network_bytes: the same for DDP's ring allreduce of the same steps.
        self.stats = {
            "steps": 0,
            "bytes_sent": 0,
            "dense_bytes": 0,
            "network_bytes": 0,
            "dense_network_bytes": 0,
            "hook_s": 0.0,
        }
        self._stats_lock = threading.Lock()
        # The C kernels of CPU buckets are built now (once per machine), not in the first backward pass.
        if dist.is_initialized() and dist.get_backend(process_group) != "nccl":
            kernels.library()

    def current_ratio(self) -> float:
        """The ratio of this step: ``ratio``, or on the way to it during the sparsity warm-up."""
        o = self.options
        done = self.iter - o.start_iter
        if o.warmup_ratio is None or done >= o.warmup_steps:
            return o.ratio
        return o.warmup_ratio * (o.ratio / o.warmup_ratio) ** (max(done, 0) / o.warmup_steps)

    def k_for(self, numel: int, world_size: int) -> int:
        """The budget of a group of ``numel`` this step among ``world_size`` ranks (:func:`raytopk.cost_model.budget`).

        Each exchange spends it as :func:`raytopk.cost_model.selected` says, so
        that every rank sends about ``2 k (W - 1) / W`` entries: what
        all-gathering each rank's top ``ceil(ratio * numel)`` sends.
        """
        return budget(self.current_ratio(), numel, world_size)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` if ``optimizer`` would apply momentum correction's momentum wrongly
        (:func:`raytopk.optim.check_optimizer`)."""
        check_optimizer(self.options.momentum, optimizer)

    def state_dict(self) -> dict:
        """Everything a resumed run needs: the options, step count, stats, and residuals (and velocities) by parameter
        name with the bucket layout they were selected over (:meth:`ResidualStore.state_dict`)."""
        return {
            **dataclasses.asdict(self.options),
            "iter": self.iter,
            "stats": dict(self.stats),
            **self.residuals.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (its options are this state's own); residuals reach their buckets on the next
        step."""
        self.iter = int(state_dict["iter"])
        self.stats.update(state_dict["stats"])
        self.residuals.load_state_dict(state_dict)

    def _add_hook_time(self, seconds: float) -> None:
        """Count time the hook computed outside the hook call: decoding and committing when a gather lands."""
        with self._stats_lock:
            self.stats["hook_s"] += seconds

    def _count(
        self, bucket: dist.GradBucket, world_size: int, sent: float, network: Optional[float], seconds: float
    ) -> None:
        """Add one bucket: ``sent`` bytes on the wire (``network`` of them across node cards; ``None``: as dense DDP's),
        against what DDP's ring allreduce would have sent."""
        nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
        dense_network = self._exchanger.dense_network_bytes(nbytes)
        with self._stats_lock:
            self.stats["bytes_sent"] += int(sent)
            self.stats["dense_bytes"] += int(dense_allreduce_bytes(nbytes, world_size))
            self.stats["network_bytes"] += int(dense_network if network is None else network)
            self.stats["dense_network_bytes"] += int(dense_network)
            self.stats["hook_s"] += seconds
            if bucket.is_last():
                self.iter += 1
                self.stats["steps"] += 1
                self.residuals.first_step_done()


def redistribute(state_dicts: List[dict], world_size: int) -> dict:
    """One :meth:`TopKState.state_dict` for each of ``world_size`` workers, from the saved ones of another count.

    What the model has yet to receive is the mean residual over workers (each
    rank's residual reaches the model divided by the worker count). Giving
    every new worker that mean keeps it: ``W'`` copies of the mean, divided by
    ``W'``, are the mean. Velocities are averaged the same way, and the byte
    counters split so that their sum over the new workers is the old sum.
    """
    first = state_dicts[0]
    merged = {key: value for key, value in first.items() if key not in KINDS and key != "stats"}
    for kind in KINDS:
        names = first.get(kind, {})
        merged[kind] = {name: torch.stack([sd[kind][name] for sd in state_dicts]).mean(0) for name in names}
    merged["stats"] = {key: sum(sd["stats"][key] for sd in state_dicts) / world_size for key in first["stats"]}
    merged["stats"]["steps"] = first["stats"]["steps"]
    return merged


def gather_state_dicts(state: TopKState, group: Optional[dist.ProcessGroup] = None) -> List[dict]:
    """Every rank's :meth:`TopKState.state_dict`, in rank order, on every rank (a collective).

    For frameworks whose checkpoints one process writes (Lightning, Accelerate):
    a rank's residual is the gradient it has yet to send, so a resume that gave
    every rank rank 0's would send rank 0's residual ``W`` times and lose the others.
    """
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, state.state_dict(), group=group)
    return states


def load_rank_state(state: TopKState, saved: List[dict], group: Optional[dist.ProcessGroup] = None) -> dict:
    """Load this rank's own state from every rank's saved ones; from another worker count, their mean.

    Returns ``{}``, or after a change of worker count ``{"resized_from": W,
    "residual_mean_error": e}``: ``e`` is the largest difference between the mean
    residual (and velocity) the ranks now hold and the saved ranks' mean, taken in
    float64 over every rank (one all-reduce per tensor, so every rank must call this).
    What remains is the float32 rounding of the saved mean; more would be a bug.
    """
    world_size = dist.get_world_size(group)
    if len(saved) == world_size:
        state.load_state_dict(saved[dist.get_rank(group)])
        return {}
    state.load_state_dict(redistribute(saved, world_size))
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    restored, error = state.state_dict(), torch.zeros((), dtype=torch.float64, device="cpu")  # compared on the host
    for kind in KINDS:
        for name, tensor in restored.get(kind, {}).items():
            ours = tensor.to(device, torch.float64)
            dist.all_reduce(ours, group=group)
            theirs = torch.stack([sd[kind][name].to(torch.float64) for sd in saved]).mean(0)
            error = torch.maximum(error, (ours.cpu() / world_size - theirs).abs().max())
    return {"resized_from": len(saved), "residual_mean_error": error.item()}


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""Send each worker's top-k gradient entries; keep the rest for the next step.

    Algorithm, per bucket of ``n`` entries on each of ``W`` workers:

    1. Before ``state.options.start_iter``: a plain dense allreduce of the mean, as DDP does.
    2. With ``clip_norm``: scale the bucket down to norm ``clip_norm / sqrt(W)`` if above it.
    3. ``acc = bucket + residual`` (error feedback: this worker's own memory),
       written into the bucket's spare residual tensor. With ``momentum``:
       ``u = momentum * u + bucket`` and ``acc = u + residual`` instead.
    4. The budget is ``k`` entries (:func:`raytopk.cost_model.budget`: what
       all-gathering each worker's top ``ceil(ratio * n)`` sends, ``ratio * n *
       W / 2``). Where sending k indices and values would cost at least as
       many bytes as the dense bucket (``ratio * W`` near 1), allreduce ``acc``
       densely instead.
    5. Exchange (:mod:`raytopk.exchange`; ``state.options.exchange``, or ``auto``'s
       choice): each exchange selects the entries of largest ``|acc|`` its
       share of the budget allows (per parameter with ``per_layer``, small ones
       dense), so every worker sends about ``2 k (W - 1) / W`` entries, as
       indices and values cast to ``value_dtype``. The exchange turns ``acc``
       into what it did not use, and writes the mean over workers of what it
       used into the bucket (each sparse entry scaled by ``1 / W`` as it is added).
    6. When the exchange completes: if the mean is finite, ``acc`` becomes the
       residual (and the velocity is cleared where used). If any rank sent inf
       or NaN (an fp16 overflow), the residual and velocity stay as they were
       and the non-finite values pass on, so every rank's GradScaler skips.

    ``state.stats["bytes_sent"]`` counts what this worker's collectives put on
    the wire by each algorithm's standard cost (a ring all-gather sends
    ``W - 1`` payloads); ``dense_bytes`` what DDP's ring allreduce would have
    sent, ``2 (W - 1) / W`` of the bucket; ``network_bytes`` and
    ``dense_network_bytes`` the part of each that left this rank's node
    (:class:`~raytopk.cost_model.Cost` says how). ``hook_s`` is the CPU time the hook's
    work took (``time.thread_time`` on each thread that ran it: the hook call,
    and the decoding and commit when a gather lands). Waiting, for the network
    or for a core another thread holds, is not the hook's cost and is left out:
    wall time would count the decoding twice on a one-core worker, once as
    itself and once as the backward pass it delayed.
    """
    started = time.thread_time()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    n, dense_bytes = buffer.numel(), buffer.numel() * buffer.element_size()
    if not state.residuals.met_all:
        state.residuals.meet(bucket.parameters())
    if state._exchanger is None:
        o = state.options
        state._exchanger = Exchanger(
            "allgather" if o.per_layer else o.exchange,
            group,
            o.link,
            o.capacity_factor,
            o.ranks_per_node or None,
            state._add_hook_time,
            o.keep_factor,
        )

    if state.iter < state.options.start_iter:
        future = _dense_allreduce(buffer, group, world_size)
        state._count(
            bucket, world_size, dense_allreduce_bytes(dense_bytes, world_size), None, time.thread_time() - started
        )
        return future

    memory = state.residuals.memory(bucket, state.options)
    value_dtype = VALUE_DTYPES[state.options.value_dtype]
    ks = [state.k_for(size, world_size) for size in memory.selection.sizes]
    k, dense = sum(ks), len(memory.selection.dense)
    if state.options.clip_norm is not None:
        _clip(buffer, state.options.clip_norm / math.sqrt(world_size))

    if payload_bytes(k, n, value_dtype, dense) >= dense_bytes:
        # Everything is sent: the residual (and with it the velocity, fully masked) empties.
        buffer.add_(memory.residual)
        if memory.velocity is not None:
            buffer.add_(memory.velocity, alpha=state.options.momentum)

        def clear_memory(fut: torch.futures.Future) -> torch.Tensor:
            mean = fut.value()
            finite = torch.isfinite(mean).all()  # chosen by torch.where, not a branch: the host never waits for a GPU
            for flat in (memory.residual, memory.velocity):
                if flat is not None:
                    torch.where(finite, flat.new_zeros(()), flat, out=flat)
            return mean

        future = _dense_allreduce(buffer, group, world_size).then(clear_memory)
        state._count(
            bucket, world_size, dense_allreduce_bytes(dense_bytes, world_size), None, time.thread_time() - started
        )
        return future

    result = state._exchanger.exchange(memory, buffer, ks, value_dtype, 1.0 / world_size, state.options.momentum)
    _tally(state, result.algorithms)

    def keep_residual(fut: torch.futures.Future) -> torch.Tensor:
        commit_started = time.thread_time()
        out, cleared, touched = fut.value()
        memory.commit(cleared, finite_at(out, touched))  # out is zero elsewhere
        state._add_hook_time(time.thread_time() - commit_started)
        return out

    state._count(bucket, world_size, result.sent, result.network, time.thread_time() - started)
    return result.future.then(keep_residual)


def _tally(state: TopKState, picked: List[str]) -> None:
    with state._stats_lock:
        for name in picked:
            state.algorithms[name] = state.algorithms.get(name, 0) + 1


def _clip(buffer: torch.Tensor, max_norm: float) -> None:
    """Scale ``buffer`` in place to norm ``max_norm`` if its norm is above it (a NaN norm passes).

    The factor is chosen on the device, so a GPU's host does not wait for the norm.
    """
    norm = torch.linalg.vector_norm(buffer).double()
    buffer.mul_(torch.where(norm > max_norm, max_norm / norm, 1.0))


def _dense_allreduce(buffer: torch.Tensor, group, world_size: int) -> torch.futures.Future[torch.Tensor]:
    """The mean over workers by one dense allreduce, as DDP's default hook computes it."""
    buffer.div_(world_size)
    work = dist.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
