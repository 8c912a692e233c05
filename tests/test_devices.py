"""Every tensor raytopk's exchanges and hook make names its device: checked on CPU, so a GPU run never meets a CPU
tensor.

A tensor factory (``torch.zeros``, ``torch.arange``, ...) called without
``device=`` makes a CPU tensor whatever the bucket's device, and on CUDA the
next collective or index fails. :class:`RequireDevice` refuses such a call
when raytopk's own code makes it, and the exchanges and the hook run under it
here on real gloo ranks, every path of the CUDA job included.
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import raytopk

from ranks import run_ranks
from test_exchange import _as_nodes, _integer_acc
from test_hook import _train

PACKAGE = os.path.dirname(raytopk.__file__)
TORCH = os.path.dirname(torch.__file__)
FACTORIES = {
    torch.arange,
    torch.empty,
    torch.full,
    torch.ones,
    torch.zeros,
    torch.tensor,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.eye,
    torch.linspace,
}


class RequireDevice(TorchFunctionMode):
    """Raise when code in the raytopk package calls a tensor factory without ``device=``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = f"{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno}"
                raise AssertionError(f"torch.{func.__name__} without device= at raytopk/{where}")
        return func(*args, **kwargs)


def test_the_guard_refuses_a_factory_without_device_in_raytopk_code():
    planted = compile("torch.arange(3)", os.path.join(PACKAGE, "planted.py"), "exec")
    with RequireDevice(), pytest.raises(AssertionError, match="torch.arange without device= at raytopk/planted.py:1"):
        exec(planted, {"torch": torch})
    with RequireDevice():
        exec(compile("torch.arange(3, device='cpu')", os.path.join(PACKAGE, "planted.py"), "exec"), {"torch": torch})
        torch.arange(3)  # outside raytopk: not its business


def test_the_gpu_selection_makes_every_tensor_on_the_inputs_device():
    from raytopk.compression import _topk_by_radix_select

    with RequireDevice():
        for dtype in (torch.float32, torch.float16, torch.float64):
            _topk_by_radix_select(torch.linspace(-1, 1, 1001, dtype=dtype), 10)


def _every_exchange_under_the_guard(rank, world_size, local_world_size):
    from raytopk.exchange import Exchanger, Link

    _as_nodes(local_world_size)
    with RequireDevice():
        algorithms = ["allgather", "sharded"] + (["hierarchical"] if local_world_size > 1 else [])
        for algorithm in algorithms:
            exchanger = Exchanger(algorithm, torch.distributed.group.WORLD, Link(), 1.0)
            for dtype in (torch.float32, torch.float16):
                acc = _integer_acc(rank, 3000, 1)
                future = exchanger.run(algorithm, acc, 200, dtype, torch.zeros_like(acc)).future
                future.wait()
        # The hook: DGC's options, fp16 values, a resume (its first step selects over the saved buckets), each exchange.
        for exchange in algorithms:
            options = {
                "exchange": exchange,
                "momentum": 0.9,
                "warmup_ratio": 0.3,
                "warmup_steps": 2,
                "clip_norm": 5.0,
                "value_dtype": "fp16",
            }
            _, checkpoint, _ = _train(rank, 5, 0, cap_mb=0.005, options=options)
            _train(rank, 2, 4, cap_mb=0.005, saved=checkpoint, options=options)
    return True


@pytest.mark.parametrize("world_size, local_world_size", [(3, 1), (4, 2)])
def test_exchanges_and_the_hook_make_every_tensor_on_the_buckets_device(world_size, local_world_size):
    assert all(run_ranks(_every_exchange_under_the_guard, world_size, local_world_size))
