"""raytopk: top-k gradient sparsification with error feedback for PyTorch DDP, trained on Ray.

The core (:mod:`raytopk.compression`, :mod:`raytopk.hook`) needs only PyTorch::

    state = raytopk.TopKState(ratio=0.01, module=model)
    ddp_model.register_comm_hook(state, raytopk.topk_hook)

The names below are imported on first use (PEP 562), so the command line can
check a job and refuse a bad one without importing PyTorch.
"""

import importlib

__all__ = ["CompressionOptions", "MomentumCorrectedSGD", "TopKState", "topk_hook"]
__version__ = "0.1.0"

_HOME = {
    "CompressionOptions": "raytopk.options",
    "TopKState": "raytopk.hook",
    "topk_hook": "raytopk.hook",
    "MomentumCorrectedSGD": "raytopk.optim",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'raytopk' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
