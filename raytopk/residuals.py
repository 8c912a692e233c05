"""Error feedback's memory: each worker's residuals (and velocities), kept by parameter and viewed by bucket.

:class:`ResidualStore` holds what :class:`~raytopk.TopKState` saves and loads:
one residual per parameter, named so that a checkpoint outlives DDP's bucket
layout. While training, each DDP bucket reads and writes its parameters'
residuals as one flat tensor, a :class:`BucketMemory`; when DDP rebuilds its
buckets, or a checkpoint is loaded, the residuals wait per parameter
("pending") until their bucket's first step. A loaded checkpoint's names are
matched to parameters as they become known (by ``module``, or by the order DDP
first hands parameters to the hook), so a checkpoint whose residuals do not fit
the model is refused at the first step.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from raytopk.compression import accumulate_topk, index_dtype, select_topk
from raytopk.options import CompressionOptions

__all__ = ["KINDS", "BucketMemory", "ResidualStore", "Selection"]

# What a checkpoint holds per parameter.
KINDS = ("residuals", "velocities")


class ResidualStore:
    """One worker's residuals (and velocities) by parameter, and its :class:`BucketMemory` per DDP bucket.

    Args:
        module: the model, to name parameters in checkpoints; ``None`` names
            them ``param0``, ``param1``, ... in the order DDP first hands them
            to the hook (:meth:`meet`).
    """

    def __init__(self, module: Optional[torch.nn.Module] = None):
        self.module = module
        self._order: Dict[torch.Tensor, int] = {}
        self.met_all = False  # this process's first step is done: every parameter has been handed over
        # A loaded checkpoint's entries, waiting for the parameter of their name.
        self._unplaced: Dict[str, Dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        self._unplaced_layout: List[Tuple[int, List[str]]] = []  # (place in the saved layout, names)
        # Error feedback: one BucketMemory per bucket index.
        self.buckets: Dict[int, BucketMemory] = {}
        # Residuals and velocities per parameter waiting for their bucket's first
        # step (after load_state_dict, or after DDP changed its bucket layout).
        self._pending: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {kind: {} for kind in KINDS}
        # The bucket layout a loaded checkpoint was selecting over, (place, parameters) in
        # saved order: a resumed DDP starts with other buckets, and selecting over the saved
        # ones until it rebuilds keeps the run identical to the uninterrupted one.
        self._placed_layout: List[Tuple[int, Tuple[torch.Tensor, ...]]] = []

    def state_dict(self) -> dict:
        """The residuals and velocities by parameter name (on the CPU), and the bucket layout by names."""
        names = self.names()
        if self.buckets:
            layout = [[names[p] for p in m.params] for _, m in sorted(self.buckets.items())]
        else:  # a loaded checkpoint's layout, its buckets placed or not yet
            saved = [(i, [names[p] for p in params]) for i, params in self._placed_layout] + self._unplaced_layout
            layout = [bucket_names for _, bucket_names in sorted(saved, key=lambda placed: placed[0])]
        return {
            **{
                kind: {
                    **{names[p]: t.detach().cpu().clone() for p, t in self._by_param(kind).items()},
                    **{name: t.clone() for name, t in self._unplaced[kind].items()},
                }
                for kind in KINDS
            },
            "buckets": layout,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; residuals reach their buckets on their next step."""
        self.buckets = {}
        self._pending = {kind: {} for kind in KINDS}
        self._placed_layout = []
        self._unplaced = {kind: {name: t.clone() for name, t in state_dict.get(kind, {}).items()} for kind in KINDS}
        self._unplaced_layout = list(enumerate(state_dict["buckets"]))
        self._place(self.names())  # every name with a module; without, those a first step has already met
        if self.module is not None or self.met_all:
            self._check_placed()

    def first_step_done(self) -> None:
        """The end of this process's first step: every parameter is known, and a loaded checkpoint must have found
        all of its own."""
        if not self.met_all:
            self.met_all = True
            self._check_placed()

    def names(self) -> Dict[torch.Tensor, str]:
        """Each parameter's name in checkpoints: by ``module``, else by its place in the first step's bucket order."""
        if self.module is not None:
            return {p: name for name, p in self.module.named_parameters()}
        return {p: f"param{i}" for p, i in self._order.items()}

    def meet(self, params) -> None:
        """Without a module: number the parameters DDP hands the hook, in order, the first time each comes."""
        if self.module is not None:
            return
        new = [p for p in params if p not in self._order]
        for p in new:
            self._order[p] = len(self._order)
        if new and any(self._unplaced.values()):
            self._place({p: f"param{self._order[p]}" for p in new})

    def _place(self, names: Dict[torch.Tensor, str]) -> None:
        """Move loaded residuals (and velocities, and saved bucket groups) to the parameters of their names."""
        for kind in KINDS:
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
        params = {name: p for p, name in self.names().items()}
        ready = [(i, names) for i, names in self._unplaced_layout if all(name in params for name in names)]
        self._placed_layout = sorted(
            self._placed_layout + [(i, tuple(params[name] for name in names)) for i, names in ready],
            key=lambda placed: placed[0],
        )
        self._unplaced_layout = [(i, names) for i, names in self._unplaced_layout if (i, names) not in ready]

    def take(self, kind: str, params, like: torch.Tensor) -> torch.Tensor:
        """The pending ``kind`` of ``params`` (zeros where none), as one flat tensor like ``like``; no longer
        pending."""
        pending = self._pending[kind]
        return torch.cat(
            [pending.pop(p).to(like).reshape(-1) if p in pending else like.new_zeros(p.numel()) for p in params]
        )

    def saved_groups(self, params) -> List[Tuple[torch.Tensor, ...]]:
        """The loaded checkpoint's buckets that lie within ``params`` (each a tuple of parameters, in saved order)."""
        return [saved for _, saved in self._placed_layout if all(p in params for p in saved)]

    def _check_placed(self) -> None:
        """Once every parameter is known: a loaded checkpoint must have found all of its own."""
        left = sorted(name for kind in KINDS for name in self._unplaced[kind])
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
        for memory in self.buckets.values():
            flat = memory.residual if kind == "residuals" else memory.velocity
            if flat is not None:
                for p, piece in zip(memory.params, flat.split([q.numel() for q in memory.params])):
                    by_param[p] = piece.view_as(p)
        return by_param

    def memory(self, bucket: dist.GradBucket, options: CompressionOptions) -> "BucketMemory":
        """This bucket's memory; rebuilt, residuals carried per parameter, when DDP changed the layout."""
        params = tuple(bucket.parameters())
        memory = self.buckets.get(bucket.index())
        if (
            memory is not None
            and len(memory.params) == len(params)
            and all(a is b for a, b in zip(memory.params, params))
        ):
            return memory
        placed = {p for m in self.buckets.values() for p in m.params}
        if memory is not None or placed.intersection(params):
            # DDP changed its bucket layout: take every residual apart by parameter.
            self._pending = {kind: self._by_param(kind) for kind in KINDS}
            self.buckets = {}
            self._placed_layout = []
        memory = BucketMemory(params, bucket.buffer(), self, options)
        self.buckets[bucket.index()] = memory
        return memory


class Selection:
    """Which entries of a bucket get a top-k of their own: the whole bucket (the common case), each large parameter
    (``per_layer``, with the small ones sent dense), or the buckets a loaded checkpoint was selecting over.

    Built once per bucket layout. ``sizes`` holds each group's entry count (the
    hook gives each a budget); ``dense`` the positions sent as bare values.
    On the first step after a resume, DDP's fresh bucket can hold several of
    the buckets the checkpoint was selecting over; each of those stays a group
    of its own (in its saved order), so the step selects exactly what the
    uninterrupted run selected.
    """

    def __init__(self, params, buffer: torch.Tensor, store: "ResidualStore", options: CompressionOptions):
        spans, start = {}, 0
        for p in params:
            spans[p] = (start, start + p.numel())
            start += p.numel()
        idx_dtype = index_dtype(buffer.numel())
        self.slices, self.groups = None, None
        self.dense = torch.empty(0, dtype=idx_dtype, device=buffer.device)  # positions sent as bare values
        if options.per_layer:
            dense = [p.dim() <= 1 or p.numel() < options.dense_below for p in params]
            self.slices = [spans[p] for p, whole in zip(params, dense) if not whole]
            if any(dense):
                whole = [torch.arange(*spans[p], device=buffer.device) for p, whole in zip(params, dense) if whole]
                self.dense = torch.cat(whole).to(idx_dtype)
        else:
            held = store.saved_groups(spans)
            if len(held) > 1 and sum(len(saved) for saved in held) == len(params):
                self.groups = [
                    torch.cat([torch.arange(*spans[p], device=buffer.device) for p in saved]) for saved in held
                ]
        if self.slices is not None:
            self.sizes = [end - start for start, end in self.slices]
        else:
            self.sizes = [buffer.numel()] if self.groups is None else [len(g) for g in self.groups]
        self.whole = self.slices is None and self.groups is None and not len(self.dense)

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


class BucketMemory:
    """One bucket's view of the store: its residual (and velocity) as flat tensors, and its :class:`Selection`.

    ``spare`` is a second residual-sized tensor: each step writes
    ``gradient + residual`` into it and, once every rank's entries arrived
    finite, it becomes the residual (the two swap). That costs one extra
    bucket of memory and saves copying the bucket back, and a step that is
    skipped (non-finite values) leaves the old residual untouched, bit for bit.
    The velocity of momentum correction is double-buffered the same way.
    """

    def __init__(self, params, buffer: torch.Tensor, store: "ResidualStore", options: CompressionOptions):
        self.params = params
        self.residual = store.take("residuals", params, buffer)
        self.spare = torch.empty_like(self.residual)
        self.velocity = store.take("velocities", params, buffer) if options.momentum else None
        self.velocity_spare = torch.empty_like(self.residual) if options.momentum else None
        self.selection = Selection(params, buffer, store, options)

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
        if self.velocity is None and self.selection.whole:
            values, indices = accumulate_topk(buffer, self.residual, self.spare, ks[0])
            return self.spare, values, indices
        acc = self.accumulate(buffer, momentum)
        buffer.zero_()
        return (acc, *self.selection.select(acc, ks))

    def commit(self, cleared: torch.Tensor, finite) -> None:
        """If every rank's step arrived ``finite``: ``acc``, which the exchange turned into what it did not use, becomes
        the residual.

        Momentum factor masking clears the velocity at ``cleared``, the
        positions whose entry the exchange used (or a bool mask of them). ``finite`` is a ``bool``, or
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
            if cleared.dtype == torch.bool:
                self.velocity_spare.masked_fill_(cleared, 0)
            else:
                self.velocity_spare.index_fill_(0, cleared, 0)
            if isinstance(finite, torch.Tensor):
                torch.where(finite, self.velocity_spare, self.velocity, out=self.velocity_spare)
            self.velocity, self.velocity_spare = self.velocity_spare, self.velocity
