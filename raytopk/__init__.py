"""raytopk: top-k gradient sparsification with error feedback for PyTorch DDP, trained on Ray.

The core (:mod:`raytopk.compression`, :mod:`raytopk.hook`) needs only PyTorch::

    state = raytopk.TopKState(ratio=0.01, module=model)
    ddp_model.register_comm_hook(state, raytopk.topk_hook)
"""

from raytopk.hook import TopKState, topk_hook
from raytopk.optim import MomentumCorrectedSGD

__all__ = ["MomentumCorrectedSGD", "TopKState", "topk_hook"]
__version__ = "0.1.0"
