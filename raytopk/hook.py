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
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from raytopk import kernels
from raytopk.compression import VALUE_DTYPES, accumulate_topk, index_dtype, payload_bytes, select_topk
from raytopk.cost_model import Link, dense_allreduce_bytes
from raytopk.exchange import Exchanger, allgather, completed, finite_at
from raytopk.optim import check_optimizer
from raytopk.options import CompressionOptions, options_from

__all__ = ["TopKState", "topk_hook", "redistribute", "gather_state_dicts", "load_rank_state"]


class TopKState:
    r"""State of :func:`topk_hook`: the compression settings and this worker's residuals.

    Each step, every worker adds its residual (what it did not send before) to
    the gradient bucket, sends its entries of largest magnitude (at two
    workers, ``k = max(1, ceil(ratio * n))`` of them; with more, as many as
    ``ratio``'s share of the wire allows) and keeps the rest as its new residual. Nothing is lost,
    only delayed: this error feedback is why training converges almost as if
    the whole gradient had been sent.

    Tuning:

    1. ``ratio`` is each worker's share of the wire, at any worker count: it
       sends ``ratio`` of the entries DDP's ring allreduce would, as index and
       value, so ``ratio * (value size + 4) / 4`` of dense fp32's bytes (2% at
       0.01). At two workers that is its top ``ratio * n`` entries; with more,
       the exchange decides how to spend it (8.). 0.01 keeps accuracy within
       noise of dense training on the CNNs we measured at two workers; 0.001
       saves ten times more and may cost a little accuracy.
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
       accuracy for that layout. Every exchange keeps ``ratio``'s bytes; with
       many workers all-gather spends them on ``2 / W`` of the ratio per worker,
       sharded on a global top-k of summed selections (its owners keep
       ``keep_factor`` times their share of the sums), which is why it is more
       accurate there. What an exchange does not use stays in the residuals.
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
        # Parameter names, for checkpoints that outlive bucket layouts; without a module,
        # each parameter's place in the first step's bucket order names it, and a loaded
        # checkpoint's entries wait here for the parameter of their name.
        self.module = module
        self._order: Dict[torch.Tensor, int] = {}
        self._met_all = False  # this process's first step is done: every parameter has been handed over
        self._unplaced: Dict[str, Dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
        self._unplaced_layout: List[Tuple[int, List[str]]] = []  # (place in the saved layout, names)
        # Error feedback: this worker's residual, one _BucketMemory per bucket index.
        self._buckets: Dict[int, _BucketMemory] = {}
        # Residuals and velocities per parameter waiting for their bucket's first
        # step (after load_state_dict, or after DDP changed its bucket layout).
        self._pending: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {kind: {} for kind in _KINDS}
        # The bucket layout a loaded checkpoint was selecting over, (place, parameters) in
        # saved order: a resumed DDP starts with other buckets, and selecting over the saved
        # ones until it rebuilds keeps the run identical to the uninterrupted one.
        self._placed_layout: List[Tuple[int, Tuple[torch.Tensor, ...]]] = []
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

    def k_for(self, numel: int) -> int:
        """The budget of a group of ``numel`` this step: ``max(1, ceil(ratio * numel))`` entries.

        Each exchange spends it as :func:`raytopk.cost_model.selected` says, so
        that every rank sends about ``2 k (W - 1) / W`` entries: at two workers,
        ``k`` of its own.
        """
        return max(1, min(numel, math.ceil(self.current_ratio() * numel)))

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` if ``optimizer`` would apply momentum correction's momentum wrongly
        (:func:`raytopk.optim.check_optimizer`)."""
        check_optimizer(self.options.momentum, optimizer)

    def state_dict(self) -> dict:
        """Everything a resumed run needs: settings, step count, stats, residuals (and velocities) by parameter name."""
        names = self._names()
        if self._buckets:
            layout = [[names[p] for p in m.params] for _, m in sorted(self._buckets.items())]
        else:  # a loaded checkpoint's layout, its buckets placed or not yet
            saved = [(i, [names[p] for p in params]) for i, params in self._placed_layout] + self._unplaced_layout
            layout = [bucket_names for _, bucket_names in sorted(saved, key=lambda placed: placed[0])]
        return {
            **dataclasses.asdict(self.options),
            "iter": self.iter,
            "stats": dict(self.stats),
            **{
                kind: {
                    **{names[p]: t.detach().cpu().clone() for p, t in self._by_param(kind).items()},
                    **{name: t.clone() for name, t in self._unplaced[kind].items()},
                }
                for kind in _KINDS
            },
            "buckets": layout,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; residuals reach their buckets on the next step."""
        self.iter = int(state_dict["iter"])
        self.stats.update(state_dict["stats"])
        self._buckets = {}
        self._pending = {kind: {} for kind in _KINDS}
        self._placed_layout = []
        self._unplaced = {kind: {name: t.clone() for name, t in state_dict.get(kind, {}).items()} for kind in _KINDS}
        self._unplaced_layout = list(enumerate(state_dict["buckets"]))
        self._place(self._names())  # every name with a module; without, those a first step has already met
        if self.module is not None or self._met_all:
            self._check_placed()

    def _names(self) -> Dict[torch.Tensor, str]:
        """Each parameter's name in checkpoints: by ``module``, else by its place in the first step's bucket order."""
        if self.module is not None:
            return {p: name for name, p in self.module.named_parameters()}
        return {p: f"param{i}" for p, i in self._order.items()}

    def _meet(self, params) -> None:
        """Without a module: number the parameters DDP hands the hook, in order, the first time each comes."""
        new = [p for p in params if p not in self._order]
        for p in new:
            self._order[p] = len(self._order)
        if new and any(self._unplaced.values()):
            self._place({p: f"param{self._order[p]}" for p in new})

    def _place(self, names: Dict[torch.Tensor, str]) -> None:
        """Move loaded residuals (and velocities, and saved bucket groups) to the parameters of their names."""
        for kind in _KINDS:
            for p, name in names.items():
                saved = self._unplaced[kind].pop(name, None)
                if saved is None:
                    continue
                if saved.shape != p.shape:
                    raise ValueError(
                        f"checkpoint residual {name} has shape {tuple(saved.shape)}, but this model's parameter "
                        f"{name} has {tuple(p.shape)}{self._load_hint()}"
                    )
                self._pending[kind][p] = saved
        params = {name: p for p, name in self._names().items()}
        ready = [(i, names) for i, names in self._unplaced_layout if all(name in params for name in names)]
        self._placed_layout = sorted(
            self._placed_layout + [(i, tuple(params[name] for name in names)) for i, names in ready],
            key=lambda placed: placed[0],
        )
        self._unplaced_layout = [(i, names) for i, names in self._unplaced_layout if (i, names) not in ready]

    @property
    def _saved_layout(self) -> List[Tuple[torch.Tensor, ...]]:
        return [params for _, params in self._placed_layout]

    def _check_placed(self) -> None:
        """Once every parameter is known: a loaded checkpoint must have found all of its own."""
        left = sorted(name for kind in _KINDS for name in self._unplaced[kind])
        if left:
            raise ValueError(
                f"checkpoint has residuals for parameters this model does not have: {left[:5]}{self._load_hint()}"
            )

    def _load_hint(self) -> str:
        if self.module is not None:
            return ""
        return (
            "; load it into the model it was saved from, or give TopKState module= to name residuals by parameter name"
        )

    def _by_param(self, kind: str) -> Dict[torch.Tensor, torch.Tensor]:
        """Every residual (``kind="residuals"``) or velocity, placed in a bucket or pending, one tensor per
        parameter."""
        by_param = dict(self._pending[kind])
        for memory in self._buckets.values():
            flat = memory.residual if kind == "residuals" else memory.velocity
            if flat is not None:
                for p, piece in zip(memory.params, flat.split([q.numel() for q in memory.params])):
                    by_param[p] = piece.view_as(p)
        return by_param

    def _memory(self, bucket: dist.GradBucket) -> "_BucketMemory":
        """This bucket's memory; rebuilt, residuals carried per parameter, when DDP changed the layout."""
        params = tuple(bucket.parameters())
        memory = self._buckets.get(bucket.index())
        if (
            memory is not None
            and len(memory.params) == len(params)
            and all(a is b for a, b in zip(memory.params, params))
        ):
            return memory
        placed = {p for m in self._buckets.values() for p in m.params}
        if memory is not None or placed.intersection(params):
            # DDP changed its bucket layout: take every residual apart by parameter.
            self._pending = {kind: self._by_param(kind) for kind in _KINDS}
            self._buckets = {}
            self._placed_layout = []
        memory = _BucketMemory(params, bucket.buffer(), self)
        self._buckets[bucket.index()] = memory
        return memory

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
                if not self._met_all:  # the end of this process's first step
                    self._met_all = True
                    self._check_placed()


def redistribute(state_dicts: List[dict], world_size: int) -> dict:
    """One :meth:`TopKState.state_dict` for each of ``world_size`` workers, from the saved ones of another count.

    What the model has yet to receive is the mean residual over workers (each
    rank's residual reaches the model divided by the worker count). Giving
    every new worker that mean keeps it: ``W'`` copies of the mean, divided by
    ``W'``, are the mean. Velocities are averaged the same way, and the byte
    counters split so that their sum over the new workers is the old sum.
    """
    first = state_dicts[0]
    merged = {key: value for key, value in first.items() if key not in _KINDS and key != "stats"}
    for kind in _KINDS:
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
    for kind in _KINDS:
        for name, tensor in restored.get(kind, {}).items():
            ours = tensor.to(device, torch.float64)
            dist.all_reduce(ours, group=group)
            theirs = torch.stack([sd[kind][name].to(torch.float64) for sd in saved]).mean(0)
            error = torch.maximum(error, (ours.cpu() / world_size - theirs).abs().max())
    return {"resized_from": len(saved), "residual_mean_error": error.item()}


# What a checkpoint holds per parameter.
_KINDS = ("residuals", "velocities")


class _BucketMemory:
    """One bucket's residual (and velocity), and the groups of its entries that each get their own top-k.

    ``spare`` is a second residual-sized tensor: each step writes
    ``gradient + residual`` into it and, once every rank's entries arrived
    finite, it becomes the residual (the two swap). That costs one extra
    bucket of memory and saves copying the bucket back, and a step that is
    skipped (non-finite values) leaves the old residual untouched, bit for bit.
    The velocity of momentum correction is double-buffered the same way.

    Groups: normally the whole bucket is one. With ``per_layer`` each large
    parameter is a group (a slice) and the small ones are sent dense. On the
    first step after a resume, DDP's fresh bucket can hold several of the
    buckets the checkpoint was selecting over; each of those stays a group of
    its own (in its saved order), so the step selects exactly what the
    uninterrupted run selected.
    """

    def __init__(self, params, buffer, state: TopKState):
        self.params = params

        def flat(kind):
            pending = state._pending[kind]
            return torch.cat(
                [pending.pop(p).to(buffer).reshape(-1) if p in pending else buffer.new_zeros(p.numel()) for p in params]
            )

        self.residual = flat("residuals")
        self.spare = torch.empty_like(self.residual)
        self.velocity = flat("velocities") if state.options.momentum else None
        self.velocity_spare = torch.empty_like(self.residual) if state.options.momentum else None
        spans, start = {}, 0
        for p in params:
            spans[p] = (start, start + p.numel())
            start += p.numel()
        idx_dtype = index_dtype(buffer.numel())
        self.slices, self.groups = None, None
        self.dense = torch.empty(0, dtype=idx_dtype, device=buffer.device)  # positions sent as bare values
        if state.options.per_layer:
            dense = [p.dim() <= 1 or p.numel() < state.options.dense_below for p in params]
            self.slices = [spans[p] for p, whole in zip(params, dense) if not whole]
            if any(dense):
                whole = [torch.arange(*spans[p], device=buffer.device) for p, whole in zip(params, dense) if whole]
                self.dense = torch.cat(whole).to(idx_dtype)
        else:
            held = [saved for saved in state._saved_layout if all(p in spans for p in saved)]
            if len(held) > 1 and sum(len(saved) for saved in held) == len(params):
                self.groups = [
                    torch.cat([torch.arange(*spans[p], device=buffer.device) for p in saved]) for saved in held
                ]
        if self.slices is not None:
            self.sizes = [end - start for start, end in self.slices]
        else:
            self.sizes = [buffer.numel()] if self.groups is None else [len(g) for g in self.groups]

    def accumulate(self, buffer: torch.Tensor, momentum: float) -> torch.Tensor:
        """Write ``residual + (momentum * velocity + buffer)`` into ``spare`` (the new velocity into its spare)."""
        added = (
            buffer
            if self.velocity is None
            else torch.add(buffer, self.velocity, alpha=momentum, out=self.velocity_spare)
        )
        return torch.add(added, self.residual, out=self.spare)

    def accumulate_select(self, buffer: torch.Tensor, momentum: float, ks: List[int]):
        """:meth:`accumulate`, :meth:`select`, and ``buffer`` zeroed (the update is added into it):
        ``(acc, values, indices)``.

        A bucket of one group with no velocity and no dense entries is the
        common case, and :func:`~raytopk.compression.accumulate_topk` fuses it.
        """
        if self.velocity is None and self.slices is None and self.groups is None and not len(self.dense):
            values, indices = accumulate_topk(buffer, self.residual, self.spare, ks[0])
            return self.spare, values, indices
        acc = self.accumulate(buffer, momentum)
        buffer.zero_()
        return (acc, *self.select(acc, ks))

    def select(self, acc: torch.Tensor, ks: List[int]):
        """The top-``ks[i]`` entries of each group of ``acc``, then the dense ones: ``(values, indices)``.

        ``indices`` covers the selected entries only; the dense values follow
        them in ``values``, at the positions in ``self.dense``.
        """
        if self.slices is not None:
            picks = [select_topk(acc[start:end], k) for (start, end), k in zip(self.slices, ks)]
            starts = [start for start, _ in self.slices]
            indices = [i + start for (_, i), start in zip(picks, starts)]
        elif self.groups is None:
            picks = [select_topk(acc, ks[0])]
            indices = [picks[0][1]]
        else:
            picks = [select_topk(acc[group], k) for group, k in zip(self.groups, ks)]
            indices = [group[i.long()] for group, (_, i) in zip(self.groups, picks)]
        values = (
            torch.cat([v for v, _ in picks] + [acc[self.dense]]) if len(picks) > 1 or len(self.dense) else picks[0][0]
        )
        indices = (
            indices[0] if len(indices) == 1 else torch.cat([self.dense[:0], *indices])
        )  # none: every parameter dense
        return values, indices.to(index_dtype(acc.numel()))

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Where a payload's values go, as int64: its ``indices``, then the dense positions."""
        return (torch.cat([indices, self.dense]) if len(self.dense) else indices).long()

    def commit(self, cleared: torch.Tensor, finite) -> None:
        """If every rank's step arrived ``finite``: ``acc``, which the exchange turned into what it did not use, becomes
        the residual.

        Momentum factor masking clears the velocity at ``cleared``, the
        positions whose entry the exchange used. ``finite`` is a ``bool``, or
        on a GPU a 0-dim bool tensor that the host does not wait for: then
        ``torch.where`` puts the old memory back into the spares when it is
        false (one more pass over the bucket on the device), and they swap
        either way.
        """
        if isinstance(finite, torch.Tensor):
            torch.where(finite, self.spare, self.residual, out=self.spare)
        elif not finite:
            return
        self.residual, self.spare = self.spare, self.residual
        if self.velocity is not None:
            self.velocity_spare.index_fill_(0, cleared, 0)
            if isinstance(finite, torch.Tensor):
                torch.where(finite, self.velocity_spare, self.velocity, out=self.velocity_spare)
            self.velocity, self.velocity_spare = self.velocity_spare, self.velocity


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""Send each worker's top-k gradient entries; keep the rest for the next step.

    Algorithm, per bucket of ``n`` entries on each of ``W`` workers:

    1. Before ``state.options.start_iter``: a plain dense allreduce of the mean, as DDP does.
    2. With ``clip_norm``: scale the bucket down to norm ``clip_norm / sqrt(W)`` if above it.
    3. ``acc = bucket + residual`` (error feedback: this worker's own memory),
       written into the bucket's spare residual tensor. With ``momentum``:
       ``u = momentum * u + bucket`` and ``acc = u + residual`` instead.
    4. The budget is ``k = max(1, ceil(ratio * n))`` entries. Where sending k
       indices and values would cost at least as many bytes as the dense
       bucket (``ratio`` near 1), allreduce ``acc`` densely instead.
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
    if state.module is None and not state._met_all:
        state._meet(bucket.parameters())
    if state._exchanger is None:
        o = state.options
        state._exchanger = Exchanger(
            "allgather" if o.per_layer else o.exchange,
            group,
            Link(inter_gbps=o.link_gbps, inter_latency_us=o.link_latency_us),
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

    memory = state._memory(bucket)
    value_dtype = VALUE_DTYPES[state.options.value_dtype]
    ks = [state.k_for(size) for size in memory.sizes]
    k, dense = sum(ks), len(memory.dense)
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

    future, sent, network = _exchange(state, memory, buffer, ks, value_dtype, 1.0 / world_size)

    def keep_residual(fut: torch.futures.Future) -> torch.Tensor:
        commit_started = time.thread_time()
        out, cleared, touched = fut.value()
        memory.commit(cleared, finite_at(out, touched))  # out is zero elsewhere
        state._add_hook_time(time.thread_time() - commit_started)
        return out

    state._count(bucket, world_size, sent, network, time.thread_time() - started)
    return future.then(keep_residual)


def _exchange(
    state: TopKState, memory: "_BucketMemory", buffer: torch.Tensor, ks: List[int], value_dtype, scale: float
):
    """Accumulate and exchange one bucket with budgets ``ks``: the future of ``(buffer, cleared, touched)`` (``buffer``:
    the sum times ``scale``), the bytes sent, and those of them that crossed a node's network card.

    All-gather takes every selection mode (per-layer, dense parameters, the
    saved groups of a resumed step) in one collective. Sharded and
    hierarchical route by position in the bucket, so on the first step after a
    resume each saved group is exchanged on its own, as the bucket it was in
    the uninterrupted run.
    """
    exchanger = state._exchanger
    value_bytes = value_dtype.itemsize
    groups = memory.groups if memory.groups is not None else [None]
    sizes = [buffer.numel() if g is None else len(g) for g in groups]
    picked = [exchanger.pick(size, k, value_bytes) for size, k in zip(sizes, ks)]
    _tally(state, picked)
    if state.options.per_layer or all(name == "allgather" for name in picked):
        chosen = [exchanger.selected("allgather", k) for k in ks]
        acc, values, indices = memory.accumulate_select(buffer, state.options.momentum, chosen)
        positions = memory.positions if len(memory.dense) else None
        future, sent = allgather(
            acc,
            values,
            indices,
            value_dtype,
            exchanger.group,
            buffer,
            positions,
            scale,
            exchanger.on_decoded,
            zeroed=True,
        )
        return future, sent, exchanger.network_bytes("allgather", buffer.numel(), sum(ks), value_bytes, sent)
    acc, out = memory.accumulate(buffer, state.options.momentum), buffer
    if memory.groups is None:
        future, sent = exchanger.run(picked[0], acc, ks[0], value_dtype, out, scale)
        return future, sent, exchanger.network_bytes(picked[0], sizes[0], ks[0], value_bytes, sent)
    cleared, touched, sent, network = [], [], 0, 0.0
    for group, size, k, name in zip(memory.groups, sizes, ks, picked):
        part, part_out = acc[group], torch.zeros(size, dtype=out.dtype, device=out.device)
        future, part_sent = exchanger.run(name, part, k, value_dtype, part_out, scale)
        _, part_cleared, part_touched = future.wait()
        acc[group], out[group] = part, part_out
        cleared.append(group[part_cleared])
        touched.append(group[part_touched])
        sent += part_sent
        network += exchanger.network_bytes(name, size, k, value_bytes, part_sent)
    return completed(out, torch.cat(cleared), torch.cat(touched)), sent, network


def _tally(state: TopKState, picked: List[str]) -> None:
    with state._stats_lock:
        for name in picked:
            state.algorithms[name] = state.algorithms.get(name, 0) + 1


def _clip(buffer: torch.Tensor, max_norm: float) -> None:
    """Scale ``buffer`` in place to norm ``max_norm`` if its norm is above it (a non-finite norm passes)."""
    norm = float(torch.linalg.vector_norm(buffer))
    if norm > max_norm:
        buffer.mul_(max_norm / norm)


def _dense_allreduce(buffer: torch.Tensor, group, world_size: int) -> torch.futures.Future[torch.Tensor]:
    """The mean over workers by one dense allreduce, as DDP's default hook computes it."""
    buffer.div_(world_size)
    work = dist.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
