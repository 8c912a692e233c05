"""The GPU path, checked on CPU: every tensor it makes names its device, and its steady state never reads a value on
the host.

A tensor factory (``torch.zeros``, ``torch.arange``, ...) called without
``device=`` makes a CPU tensor whatever the bucket's device, and on CUDA the
next collective or index fails. :class:`RequireDevice` refuses such a call
when raytopk's own code makes it, and the exchanges and the hook run under it
here on real gloo ranks, every path of the CUDA job included.

A host read of a GPU value (``.item()``, ``int(t)``, a boolean mask,
``torch.unique``: anything whose result or size the host must learn) makes
the backward pass wait for the GPU. :func:`no_host_reads` refuses those ops in
raytopk's code, future callbacks included, while the exchanges and the hook
take their accelerator path on CPU tensors (:func:`raytopk.devices.accelerator_path`);
the same runs check that path against the CPU path's results.
"""

import contextlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import raytopk
from raytopk.devices import accelerator_path

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


aten = torch.ops.aten
# Ops whose result the host must read, or whose output size depends on the values: on a GPU, each waits for the device.
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
    aten.equal.default,
    aten.is_nonzero.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _raytopk_caller(what: str) -> None:
    """Raise, naming ``what`` and the line, when the nearest caller outside torch and these guards is raytopk's
    code."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
        raise AssertionError(f"{what} at raytopk/{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno}")


class RequireDevice(TorchFunctionMode):
    """Raise when code in the raytopk package calls a tensor factory without ``device=``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            _raytopk_caller(f"torch.{func.__name__} without device=")
        return func(*args, **kwargs)


class _NoHostReadOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
        )
        if func in HOST_READS or masked:
            _raytopk_caller(f"a host read ({func}{', a boolean mask' if masked else ''})")
        return func(*args, **(kwargs or {}))


class _NoHostCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            _raytopk_caller(f"a host read (Tensor.{func.__name__})")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Refuse, in raytopk's code, every op that would make a GPU's host wait (:data:`HOST_READS`, boolean masks,
    copies to the host), also inside the callbacks of futures chained meanwhile (they run on gloo's threads)."""
    then = torch._C.Future.then  # what every future, also torch.futures.Future, calls

    def guarded_then(future, callback):
        def guarded(fut):
            with _NoHostReadOps(), _NoHostCopies():
                return callback(fut)

        return then(future, guarded)

    torch._C.Future.then = guarded_then
    try:
        with _NoHostReadOps(), _NoHostCopies():
            yield
    finally:
        torch._C.Future.then = then


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


def test_the_host_read_guard_refuses_reads_in_raytopk_code_and_its_callbacks():
    def planted(code):
        return compile(code, os.path.join(PACKAGE, "planted.py"), "exec")

    x = torch.linspace(-1, 1, 9)
    for code, what in [
        ("int(x.max())", "_local_scalar_dense"),
        ("x[x > 0]", "a boolean mask"),
        ("torch.unique(x)", "_unique2"),
        ("torch.bincount(x.long() + 1)", "bincount"),
        ("x.tolist()", "Tensor.tolist"),
    ]:
        with no_host_reads(), pytest.raises(AssertionError, match=f"{what}.* at raytopk/planted.py:1"):
            exec(planted(code), {"torch": torch, "x": x})
    done = torch.futures.Future()
    done.set_result(x)
    raised_in_callback = pytest.raises(RuntimeError, match="_local_scalar_dense.* at raytopk/planted.py:1")
    with no_host_reads(), raised_in_callback:
        exec(planted("fut.then(lambda f: f.value().sum().item()).wait()"), {"fut": done})
    with no_host_reads():
        exec(planted("torch.where(x > 0, x, 0).sum()"), {"torch": torch, "x": x})
        int(x.max()), x[x > 0]  # outside raytopk: not its business


@contextlib.contextmanager
def _gpu_path():
    """The accelerator path on CPU tensors, refusing every host read."""
    with accelerator_path(), no_host_reads():
        yield


def _steady_state_guarded(first_read_free: int):
    """``topk_hook`` under :func:`no_host_reads` from step ``first_read_free`` on (a state's first compressed step
    builds what later steps reuse, and the first after a resume selects over the saved buckets)."""

    def hook(state, bucket):
        with no_host_reads() if state.iter >= first_read_free else contextlib.nullcontext():
            return raytopk.topk_hook(state, bucket)

    return hook


def _as_mask(cleared: torch.Tensor, numel: int) -> torch.Tensor:
    """An exchange's ``cleared`` (positions, in any order, or a bool mask) as a bool mask."""
    if cleared.dtype == torch.bool:
        return cleared
    return torch.zeros(numel, dtype=torch.bool).index_fill_(0, cleared, True)


def _the_gpu_path_on_cpu(rank, world_size, local_world_size, with_the_hook):
    from raytopk.exchange import Exchanger, Link

    _as_nodes(local_world_size)
    algorithms = ["allgather", "sharded"] + (["hierarchical"] if local_world_size > 1 or world_size == 1 else [])
    for algorithm in algorithms:
        exchanger = Exchanger(algorithm, torch.distributed.group.WORLD, Link(), 1.0)
        for dtype, k in ((torch.float32, 200), (torch.float16, 37)):
            results = []
            for path in (contextlib.nullcontext, _gpu_path):
                acc = _integer_acc(rank, 3000, 1)
                out = torch.zeros_like(acc)
                with path():
                    _, cleared, _ = exchanger.run(algorithm, acc, k, dtype, out).future.wait()
                results.append((out, acc, _as_mask(cleared, 3000)))
            for what, on_cpu, on_gpu_path in zip(("update", "residual", "cleared"), *results):
                assert torch.equal(on_cpu, on_gpu_path), f"{algorithm} {dtype}: the {what} differs"
    # The hook: DGC's options, fp16 values, a resume, and a step through the dense fallback, each exchange; and
    # DGC's per-layer selection with small parameters sent dense, its sparsity warm-up, bf16 values.
    dgc = {"momentum": 0.9, "clip_norm": 5.0, "value_dtype": "fp16"}
    per_layer = {**dgc, "per_layer": True, "dense_below": 100, "warmup_ratio": 0.25, "warmup_steps": 3}
    option_sets = [{"exchange": exchange, **dgc} for exchange in algorithms] + [{**per_layer, "value_dtype": "bf16"}]
    for options in option_sets if with_the_hook else []:
        for ratio in (0.01, 0.9):
            runs = []
            for on_gpu_path in (False, True):
                hooks = [_steady_state_guarded(first) if on_gpu_path else raytopk.topk_hook for first in (3, 5)]
                with accelerator_path() if on_gpu_path else contextlib.nullcontext():
                    weights, checkpoint, _ = _train(
                        rank, 5, 0, 0.005, options={**options, "ratio": ratio}, hook=hooks[0]
                    )
                    resumed, _, _ = _train(rank, 2, 4, 0.005, checkpoint, {**options, "ratio": ratio}, hooks[1])
                runs.append((weights, resumed))
            assert all(torch.equal(a, b) for a, b in zip(*runs)), f"{options} at ratio {ratio}: weights differ"
    return True


@pytest.mark.parametrize(
    "world_size, local_world_size, with_the_hook", [(1, 1, True), (3, 1, True), (4, 2, True), (10, 2, False)]
)
def test_the_gpu_path_reads_nothing_on_the_host_and_matches_the_cpu_path(world_size, local_world_size, with_the_hook):
    """Every exchange (10 ranks: the two-level one sharded across 5 nodes) and the hook's steady state (DGC's options,
    fp16, after a resume, the dense fallback) take the accelerator path on CPU tensors: not one host read in
    raytopk's code, and the same update, residual and weights as the CPU path, bit for bit."""
    assert all(run_ranks(_the_gpu_path_on_cpu, world_size, local_world_size, with_the_hook))
