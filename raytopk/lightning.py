"""PyTorch Lightning: :class:`TopKCompression`, a Callback that puts raytopk's hook on Lightning's DDP model.

    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, callbacks=[TopKCompression(ratio=0.01)])

Why a callback: Lightning's own ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``
registers a hook only when the root device is CUDA; on CPU (gloo) it trains densely
without a word. The callback registers the hook on any device, once the strategy has
wrapped the model, and carries every rank's residual through Lightning's checkpoints:
they are written by rank 0 alone, so each save gathers all ranks' hook states into the
checkpoint dict (``checkpoint["raytopk"]``, a few times the gradient's size, which is
what a resumed run needs), and each rank takes its own back on load; a run resumed on
another number of devices starts every rank from the mean residual, as
:func:`raytopk.hook.redistribute` does for Ray Train. Bytes on the wire and the reduction
go to Lightning's logger each epoch (``raytopk/bytes_sent``, ``raytopk/reduction``).

Works with ``import lightning as L`` and, where that is what is installed, ``pytorch_lightning``.
"""

import warnings
from typing import Optional

from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk.hook import TopKState, gather_state_dicts, load_rank_state, topk_hook
from raytopk.optim import check_optimizer
from raytopk.options import CompressionOptions, options_from

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback

__all__ = ["TopKCompression"]

CHECKPOINT_KEY = "raytopk"


class TopKCompression(Callback):
    """Top-k compression of DDP's gradient exchange for a Lightning ``Trainer`` (``strategy="ddp"``).

    Args:
        options: a :class:`~raytopk.CompressionOptions`; ``None`` is its defaults.
        **changes: options by name, over ``options`` (``ratio``, ``exchange``, Deep Gradient Compression's, ...).

    Bad options fail when the callback is built; with momentum correction, an
    optimizer that would apply the momentum again fails when training starts
    (:meth:`raytopk.TopKState.check_optimizer`).
    """

    def __init__(self, options: Optional[CompressionOptions] = None, **changes):
        self.options = options_from(options, **changes)
        self.state = None  # this rank's TopKState, once training starts
        self._loaded = None  # every rank's saved state, from a checkpoint, until the hook is registered

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer in trainer.optimizers:
            check_optimizer(self.options.momentum, optimizer)
        model = trainer.strategy.model
        if not isinstance(model, DDP):
            warnings.warn(
                f"TopKCompression: the strategy's model is a {type(model).__name__}, not DistributedDataParallel "
                "(one process, or another strategy); gradients are not compressed"
            )
            return
        self.state = TopKState(self.options, module=pl_module)
        model.register_comm_hook(self.state, topk_hook)
        if self._loaded is not None:
            self._restore()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Gather every rank's hook state into the checkpoint (a collective: Lightning calls it on every rank)."""
        if self.state is None:
            return
        checkpoint[CHECKPOINT_KEY] = gather_state_dicts(self.state)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._loaded = checkpoint.get(CHECKPOINT_KEY)
        if self._loaded is not None and self.state is not None:
            self._restore()

    def _restore(self) -> None:
        saved, self._loaded = self._loaded, None
        load_rank_state(self.state, saved)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.state is None:
            return
        sent, dense = float(self.state.stats["bytes_sent"]), float(self.state.stats["dense_bytes"])
        pl_module.log_dict({"raytopk/bytes_sent": sent, "raytopk/dense_bytes": dense}, sync_dist=True, reduce_fx="sum")
        pl_module.log("raytopk/reduction", dense / sent if sent else 1.0, sync_dist=True)
