"""Ray Train: :func:`prepare_model` for hand-written training loops, and each rank's hook state in a checkpoint.

Swap Ray's ``ray.train.torch.prepare_model`` for this one::

    model = raytopk.ray.prepare_model(model, ratio=0.01)
    ...
    with tempfile.TemporaryDirectory() as directory:
        raytopk.ray.save_state(model, directory)  # every rank: its own residual, rank{r}.pt
        if ray.train.get_context().get_world_rank() == 0:
            torch.save(model.module.state_dict(), os.path.join(directory, "model.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    ...
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as directory:
            raytopk.ray.load_state(model, directory)

Why a ``prepare_model`` of its own: Ray's returns the bare model for one worker, where
a hook has nothing to register on; this one always returns a DDP model with the hook,
so one worker runs the same code as many. Why per-rank files: every Ray Train worker
reports a checkpoint directory and Ray merges them, so each rank writes its own residual
beside the model and no gather is needed; a group of another size (an elastic resize)
starts every rank from the saved ranks' mean residual
(:func:`raytopk.hook.load_rank_state`). ``raytopk train`` runs on these same helpers.
"""

import weakref
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk.checkpoint import load_rank, rank_file, save_rank
from raytopk.hook import TopKState, topk_hook
from raytopk.options import CompressionOptions

__all__ = ["prepare_model", "hook_state", "save_state", "load_state", "rank_file", "SPARSE_BUCKET_CAP_MB"]

# DDP's bucket size for the hook: 25 MB, DDP's own size for every bucket but the first
# (see prepare_model for why the first is no smaller).
SPARSE_BUCKET_CAP_MB = 25

_STATES = weakref.WeakKeyDictionary()  # DDP model -> its TopKState, for save_state / load_state / hook_state


def prepare_model(
    model: torch.nn.Module,
    ratio: Optional[float] = CompressionOptions.ratio,
    *,
    state: Optional[TopKState] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    parallel_strategy_kwargs: Optional[dict] = None,
    **options,
) -> DDP:
    """Move ``model`` to this worker's device and wrap it in DDP with raytopk's hook, whatever the worker count.

    Buckets: DDP makes its first bucket small (1 MB) so that its dense
    allreduce starts early in the backward pass. A sparse exchange sends about
    ``ratio`` of a bucket, so starting early gains little, while every bucket
    costs the hook a fixed amount (a selection, a collective launch, decoding).
    With the hook, the first bucket is therefore as large as the others
    (``bucket_cap_mb=SPARSE_BUCKET_CAP_MB``): a model under 25 MB of
    gradients is exchanged as one bucket. Plain DDP (``ratio=None``, no
    ``state``) keeps DDP's defaults.

    Args:
        model: the module to train, as given to ``ray.train.torch.prepare_model``.
        ratio: fraction of each DDP bucket's entries sent; ``None`` for plain DDP
            (a dense baseline that saves and loads the same checkpoints).
        state: a :class:`~raytopk.TopKState` built by hand, instead of ``ratio`` and ``options``.
        optimizer: the optimizer of ``model``'s parameters, checked against the
            hook's options (:meth:`~raytopk.TopKState.check_optimizer`); momentum
            correction needs it.
        parallel_strategy_kwargs: keyword arguments for DDP, as in Ray's
            ``prepare_model`` (``bucket_cap_mb``, ``find_unused_parameters``, ...); they
            take precedence over the bucket size above.
        **options: any other compression option by name (:class:`~raytopk.CompressionOptions`: ``start_iter``,
            ``exchange``, ...).
    """
    import ray.train.torch

    if state is None and ratio is not None:
        state = TopKState(ratio=ratio, module=model, **options)
        if state.options.momentum and optimizer is None:
            raise ValueError("prepare_model: momentum correction needs optimizer=, to check it against the hook")
    elif options:
        raise ValueError(f"prepare_model: options {sorted(options)} need ratio= and no state=")
    if state is not None and optimizer is not None:
        state.check_optimizer(optimizer)
    device = ray.train.torch.get_device()
    model = model.to(device)
    # Gradients as views into DDP's buckets: no copy into the buckets and back each step.
    ddp_kwargs = {
        "gradient_as_bucket_view": True,
        **({"bucket_cap_mb": SPARSE_BUCKET_CAP_MB} if state is not None else {}),
    }
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        **{**ddp_kwargs, **(parallel_strategy_kwargs or {})},
    )
    if state is not None:
        ddp.register_comm_hook(state, topk_hook)
        _STATES[ddp] = state
    return ddp


def hook_state(model: DDP) -> Optional[TopKState]:
    """The :class:`~raytopk.TopKState` :func:`prepare_model` registered on ``model`` (its ``stats``: bytes, steps), or
    None."""
    return _STATES.get(model)


def save_state(model: DDP, directory: str, **extra) -> None:
    """Write this rank's hook state, and ``extra`` (anything ``torch.save`` takes), to ``directory``/``rank{r}.pt``.

    Every rank calls it on its own copy of the checkpoint directory; Ray Train merges them.
    """
    save_rank(hook_state(model), directory, **extra)


def load_state(model: DDP, directory: str, map_location="cpu") -> dict:
    """Load what :func:`save_state` wrote for this rank into ``model``'s hook; return its ``extra``.

    From a checkpoint of another worker count, see :func:`raytopk.checkpoint.load_rank`. Every rank must call it.
    """
    return load_rank(hook_state(model), directory, map_location)
