"""Hugging Face Accelerate: :func:`attach` puts raytopk's hook on the model ``accelerator.prepare`` returned.

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = raytopk.accelerate.attach(accelerator, model, ratio=0.01)

Why a function: Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` takes
only its enum of PyTorch's built-in hooks, and ignores any other. ``attach`` registers
the hook on the prepared DDP model (through ``torch.compile``'s wrapper), and registers
the hook state for checkpointing: ``accelerator.save_state`` asks every process for it
and writes the main process's copy, so the registered object gathers every rank's
residual into that copy, and ``load_state`` gives each rank its own back (on another
number of processes, every rank starts from the mean residual). With
``accelerator.accumulate``, DDP skips the gradient exchange on the micro-batches between
optimizer steps, so the hook runs once per optimizer step.
"""

import warnings
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk.hook import TopKState, gather_state_dicts, load_rank_state, topk_hook
from raytopk.optim import check_optimizer
from raytopk.options import CompressionOptions, options_from

__all__ = ["attach"]


def attach(
    accelerator, model: torch.nn.Module, options: Optional[CompressionOptions] = None, **changes
) -> Optional[TopKState]:
    """Register raytopk's hook on ``model`` (what ``accelerator.prepare`` returned); return its
    :class:`~raytopk.TopKState`.

    ``options`` (a :class:`~raytopk.CompressionOptions`, ``None`` for its
    defaults) and ``changes`` (options by name, ``ratio=0.01``) are the hook's.
    With momentum correction, the optimizers the accelerator has prepared are
    checked (:meth:`~raytopk.TopKState.check_optimizer`). Without DDP (one
    process) there is nothing to compress: it warns and returns None.
    """
    options = options_from(options, **changes)
    for optimizer in accelerator._optimizers:  # those it has prepared; AcceleratedOptimizer wraps the user's
        check_optimizer(options.momentum, getattr(optimizer, "optimizer", optimizer))
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP model
    if not isinstance(ddp, DDP):
        warnings.warn(
            f"raytopk.accelerate.attach: the model is a {type(ddp).__name__}, not DistributedDataParallel "
            "(one process?); gradients are not compressed"
        )
        return None
    state = TopKState(options, module=ddp.module)
    ddp.register_comm_hook(state, topk_hook)
    accelerator.register_for_checkpointing(_EveryRank(state))
    return state


class _EveryRank:
    """The hook state as ``accelerator.save_state`` / ``load_state`` see it: every rank's, gathered."""

    def __init__(self, state: TopKState):
        self.state = state

    def state_dict(self) -> dict:
        return {"ranks": gather_state_dicts(self.state)}  # save_state calls this on every process

    def load_state_dict(self, saved: dict) -> None:
        load_rank_state(self.state, saved["ranks"])
