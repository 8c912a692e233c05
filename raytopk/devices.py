"""Where the host may read a tensor: the one switch between raytopk's CPU path and its accelerator path.

On the CPU, reading a value or a size costs nothing, and raytopk uses that:
C kernels (:mod:`raytopk.kernels`), a sampled threshold whose survivors it
counts, a sort it skips when it can see that no owner overflows. On a GPU, a
read (``.item()``, ``int(t)``, a boolean mask, ``torch.unique``, anything
whose size depends on the data) makes the host wait for every kernel queued
before it, in the middle of the backward pass. So there every size is fixed
in advance and every decision stays on the device as a tensor
(``torch.where``, ``torch.nonzero_static``, padded buffers), and the backward
pass keeps launching while the GPU computes, as plain DDP's does.

:func:`accelerator_path` runs the second path on any tensor: the test suite
runs it on the CPU, under a guard that refuses every host read, and against
the CPU path's results.
"""

import contextlib

import torch

__all__ = ["on_host", "accelerator_path"]

_HOST_DEVICES = {"cpu"}


def on_host(*tensors: torch.Tensor) -> bool:
    """Whether the host reads every one of ``tensors`` without waiting for a device: CPU tensors (see the module)."""
    return all(t.device.type in _HOST_DEVICES for t in tensors)


@contextlib.contextmanager
def accelerator_path():
    """Within this block, CPU tensors take the accelerator path too (for checking that path on a CPU)."""
    saved = set(_HOST_DEVICES)
    _HOST_DEVICES.clear()
    try:
        yield
    finally:
        _HOST_DEVICES.update(saved)
