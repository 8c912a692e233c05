"""The GPU selection's Triton kernels, checked without a GPU: compiled for one, and run on CPU by Triton's interpreter,
where they give the PyTorch path's result bit for bit, in the selection, in the hook's fused accumulation, and
through every exchange and the hook.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so each
interpreted check runs in a process started with it (``run_ranks(..., env=...)``).
"""

import collections
import os

import pytest
import torch

from raytopk import triton_kernels
from raytopk.devices import accelerator_path

from ranks import run_ranks
from test_devices import _steady_state_guarded, _the_gpu_path_on_cpu
from test_hook import _train
from test_kernels import _tensors

pytestmark = pytest.mark.skipif(triton_kernels.triton is None, reason="Triton is not installed with this PyTorch")
INTERPRETED = {"TRITON_INTERPRET": "1"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Triton's names of the types the launches pass.
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
TRITON_TYPES.update({torch.int64: "i64", torch.uint8: "u8"})


def _signature(kernel, args, constants) -> dict:
    types = {
        name: f"*{TRITON_TYPES[arg.dtype]}" if isinstance(arg, torch.Tensor) else "i32" if arg < 2**31 else "i64"
        for name, arg in zip(kernel.arg_names, args)
    }
    return {**types, **{name: "constexpr" for name in constants}}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_launch_compiles_for_a100_and_h100_gpus(dtype, arch):
    """Triton compiles each launch of the selection, the fused accumulation's included, with its very arguments, to a
    binary for sm_80 (A100) and sm_90 (H100, H200): what the interpreter lets pass (types, layouts, constexpr
    arithmetic) the GPU compiler checks here too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    x = torch.zeros(5000, dtype=dtype)
    _, _, launches = triton_kernels._plan(x, 50, torch.zeros_like(x), torch.zeros_like(x))
    kernels = [kernel for kernel, *_ in launches]
    histograms = kernels.count(triton_kernels._histogram_kernel)
    assert kernels == [triton_kernels._histogram_kernel] * histograms + [
        triton_kernels._count_kernel,
        triton_kernels._write_kernel,
    ]
    for kernel, _, args, constants in launches:
        source = ASTSource(kernel, _signature(kernel, args, constants), constants)
        assert triton_kernels.triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["cubin"]


def test_where_triton_cannot_run_the_kernels_the_hook_warns_and_takes_the_pytorch_path():
    """Launching them without a GPU fails as on one Triton does not support: one warning, then the PyTorch path."""
    with pytest.warns(RuntimeWarning, match=r"Triton could not run its selection kernels for torch.float32 on cpu"):
        assert not triton_kernels._compiles.__wrapped__(torch.float32, torch.device("cpu"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by their bits, so NaN equals NaN and -0.0 differs from 0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _selections_that_differ(rank, world_size):
    from raytopk.compression import _topk_by_radix_select

    assert triton_kernels.usable(torch.zeros(1)), "the kernels do not run interpreted"
    os.environ["RAYTOPK_TRITON"] = "0"
    assert not triton_kernels.usable(torch.zeros(1)), "RAYTOPK_TRITON=0 does not choose the PyTorch path"
    del os.environ["RAYTOPK_TRITON"]
    differ = []
    for name, x in _tensors().items():
        for dtype in DTYPES:
            x = x[:20_011].to(dtype)  # the interpreter is slow; what makes each case hard stays
            for k in sorted({1, max(1, x.numel() // 100), x.numel()}):
                expected = _topk_by_radix_select(x, k)
                values, indices = triton_kernels.topk(x, k)
                if not (torch.equal(indices, expected[1]) and torch.equal(_bits(values), _bits(expected[0]))):
                    differ.append((name, dtype, k))
    return differ


def test_the_triton_selection_is_the_pytorch_radix_selects_bit_for_bit():
    """Ties, zeros, signed zeros, NaN and infinities, odd lengths, k from 1 to every entry, three dtypes."""
    assert run_ranks(_selections_that_differ, 1, env=INTERPRETED) == [[]]


def _accumulations_that_differ(rank, world_size):
    from raytopk.compression import _topk_by_radix_select

    differ = []
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        # Half-precision sums round once from float32, as torch.add rounds them; large and small terms make them round.
        grad = (torch.randn(30_001, generator=g) * torch.logspace(-6, 4, 30_001)).to(dtype)
        residual = (torch.randn(30_001, generator=g) * 1e-3).to(dtype)
        for k in (1, 700, 30_001):
            fused_grad, acc = grad.clone(), torch.empty_like(grad)
            values, indices = triton_kernels.accumulate_topk(fused_grad, residual, acc, k)
            expected_acc = torch.add(grad, residual)
            expected = _topk_by_radix_select(expected_acc, k)
            if not (
                torch.equal(_bits(acc), _bits(expected_acc))
                and not fused_grad.any()
                and torch.equal(indices, expected[1])
                and torch.equal(_bits(values), _bits(expected[0]))
            ):
                differ.append((dtype, k))
    return differ


def test_the_fused_accumulation_adds_zeroes_and_selects_as_pytorch_does():
    assert run_ranks(_accumulations_that_differ, 1, env=INTERPRETED) == [[]]


def _the_gpu_path_through_the_kernels(rank, world_size, local_world_size):
    """Every exchange (:func:`test_devices._the_gpu_path_on_cpu`), then the hook with all-gather's options (where the
    first pass also accumulates) and with fp16 values through sharded, on the CPU path and on the accelerator path
    through the kernels, under the host-read guard from the third step: the same weights, bit for bit. Returns how
    many selections and fused accumulations the kernels made."""
    select, calls = triton_kernels._select, collections.Counter()

    def counted(x, k, grad=None, residual=None):
        calls["accumulate_topk" if grad is not None else "topk"] += 1
        return select(x, k, grad, residual)

    triton_kernels._select = counted
    try:
        assert _the_gpu_path_on_cpu(rank, world_size, local_world_size, False)
        for options in ({"exchange": "allgather"}, {"exchange": "sharded", "value_dtype": "fp16"}):
            on_cpu, _, _ = _train(rank, 6, 0, 0.005, options=options)
            with accelerator_path():
                through_the_kernels, _, _ = _train(rank, 6, 0, 0.005, options=options, hook=_steady_state_guarded(3))
            assert torch.equal(on_cpu, through_the_kernels), f"{options}: the weights differ"
    finally:
        triton_kernels._select = select
    return calls


def test_every_exchange_and_the_hook_give_the_cpu_paths_results_through_the_kernels():
    """On two nodes of two ranks, every exchange with fp32 and fp16 values, and the hook, through the kernels."""
    calls = run_ranks(_the_gpu_path_through_the_kernels, 4, 2, env=INTERPRETED)
    assert all(rank["topk"] > 0 and rank["accumulate_topk"] > 0 for rank in calls), calls
