"""The CUDA path: exact selection on the GPU and the hook in a one-rank NCCL group. Skipped without a GPU."""

import copy
import dataclasses
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from raytopk import triton_kernels
from raytopk.compression import _topk_by_radix_select, accumulate_topk, select_topk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import gpu_exchanges  # noqa: E402  (a benchmark script: the checks gpu_check.sh runs, shared with this test)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("numel, k", [(1_000, 10), (5_000_000, 50_000), (25_000_001, 25_000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_selection_on_cuda_is_exact(numel, k, dtype):
    x = torch.randn(numel, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(numel))
    values, indices = select_topk(x, k)
    assert values.device.type == "cuda" and values.dtype == dtype
    kth = torch.topk(x.abs().float(), k).values.min()
    assert len(set(indices.tolist())) == k and bool((x[indices.long()].abs().float() >= kth).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_triton_kernels_pick_what_the_pytorch_path_and_the_cpu_pick(dtype):
    """On many ties (eighths from -6 to 6) and on normal values: the Triton kernels' values and indices are the
    PyTorch radix select's bit for bit, the same entries as the CPU path's (the lowest positions among ties), and the
    fused accumulation's sums are torch.add's."""
    g = torch.Generator().manual_seed(7)
    for x in ((torch.randint(-48, 49, (3_000_001,), generator=g) / 8).to(dtype), torch.randn(3_000_001).to(dtype)):
        gpu = x.cuda()
        assert triton_kernels.usable(gpu)
        for k in (1, 30_000, len(x)):
            values, indices = select_topk(gpu, k)
            radix = _topk_by_radix_select(gpu, k)
            assert torch.equal(indices, radix[1]) and torch.equal(values, radix[0])
            cpu_values, cpu_indices = select_topk(x, k)
            order = cpu_indices.argsort()
            assert torch.equal(indices.cpu(), cpu_indices[order]) and torch.equal(values.cpu(), cpu_values[order])
        grad, residual, acc = gpu.clone(), torch.randn(len(x), generator=g).to(dtype).cuda(), torch.empty_like(gpu)
        values, indices = accumulate_topk(grad, residual, acc, 30_000)
        expected = torch.add(gpu, residual)
        assert torch.equal(acc, expected) and not grad.any()
        assert torch.equal(indices, _topk_by_radix_select(expected, 30_000)[1])


@pytest.fixture
def nccl_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29660")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16", "bf16"])
def test_hook_on_nccl_applies_topk_and_keeps_the_rest(nccl_group, value_dtype):
    """One rank: the applied gradient is the top-k of (gradient + residual); applied + residual is the whole."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    ddp = DDP(model, device_ids=[torch.cuda.current_device()], bucket_cap_mb=1)
    state = raytopk.TopKState(ratio=0.01, start_iter=0, value_dtype=value_dtype, module=model)
    ddp.register_comm_hook(state, raytopk.topk_hook)
    x, y = torch.randn(32, 256, device="cuda"), torch.randint(10, (32,), device="cuda")
    reference = torch.nn.functional.cross_entropy(model(x), y)
    full = torch.autograd.grad(reference, list(model.parameters()))
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    applied = torch.cat([p.grad.flatten() for p in model.parameters()])
    residual = torch.cat(
        [state.state_dict()["residuals"][name].flatten().cuda() for name, _ in model.named_parameters()]
    )
    whole = torch.cat([g.flatten() for g in full])
    assert 0 < int((applied != 0).sum()) <= 0.02 * whole.numel() + 16
    # The residual keeps what fp16 or bf16 rounded off the sent values, so nothing but fp32 rounding is lost.
    torch.testing.assert_close(applied + residual, whole, rtol=1e-6, atol=1e-7)
    # One rank has no peer: the counters report what crossed the wire, which is nothing, for either exchange.
    assert state.stats["bytes_sent"] == state.stats["dense_bytes"] == 0


def _host_waited_for_the_gpu(ddp, x, y, scale: float = 1.0) -> bool:
    """Whether ``backward()`` returned only after the GPU ran what was queued before it.

    About a second of ``torch.cuda._sleep`` goes on the stream first; a
    backward pass that never reads a GPU value on the host returns in
    milliseconds, long before the sleep ends.
    """
    loss = torch.nn.functional.cross_entropy(ddp(x), y) * scale
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    slept = torch.cuda.Event()
    slept.record()
    loss.backward()
    waited = slept.query()
    torch.cuda.synchronize()
    return waited


@pytest.mark.parametrize("ratio", [0.01, 1.0])
def test_a_non_finite_step_on_nccl_keeps_the_memory_without_waiting_for_the_gpu(nccl_group, ratio):
    """An inf step, sparse (ratio 0.01) or through the dense fallback (1.0), keeps residual and velocity bit for bit,
    and the next finite step changes them. The check stays on the GPU: such a backward pass returns before the GPU
    has run it, as plain DDP's does. The first step of each path may wait once (on an H200 the first dense
    fallback step did, at its first ``div_``), so waits count from the third step on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    plain = DDP(copy.deepcopy(model), device_ids=[torch.cuda.current_device()], bucket_cap_mb=1)
    ddp = DDP(model, device_ids=[torch.cuda.current_device()], bucket_cap_mb=1)
    state = raytopk.TopKState(ratio=0.01, start_iter=0, momentum=0.9, module=model)
    ddp.register_comm_hook(state, raytopk.topk_hook)
    x, y = torch.randn(32, 256, device="cuda"), torch.randint(10, (32,), device="cuda")
    _host_waited_for_the_gpu(plain, x, y)
    assert not _host_waited_for_the_gpu(plain, x, y), (
        "plain DDP's backward waited for the GPU: the check below means nothing"
    )
    # Sparse steps fill the memory, so that a finite step through the dense fallback changes it (it empties it).
    for step, (step_ratio, poisoned) in enumerate(
        [(0.01, False), (ratio, False), (0.01, False), (ratio, True), (ratio, False)]
    ):
        state.options = dataclasses.replace(state.options, ratio=step_ratio)
        before = state.state_dict()
        ddp.zero_grad()
        waited = _host_waited_for_the_gpu(ddp, x, y, float("inf") if poisoned else 1.0)
        after = state.state_dict()
        assert not (step >= 2 and waited), f"step {step}: the hook made the host wait for the GPU"
        if step:
            same = all(
                torch.equal(before[kind][name], after[kind][name])
                for kind in ("residuals", "velocities")
                for name in before[kind]
            )
            assert same == poisoned, f"step {step}: memory {'changed' if not same else 'unchanged'}"


@pytest.mark.parametrize("exchange", ["allgather", "sharded", "hierarchical"])
def test_steady_steps_of_every_exchange_on_nccl_never_wait_for_the_gpu(nccl_group, exchange):
    """One rank (the two-level exchange is then its stage across nodes alone), DGC's options and fp16 values: from the
    third step on, the backward pass returns before the GPU has run it, as plain DDP's does. (The CPU suite checks
    the same path with several ranks for any host read: tests/test_devices.py.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    ddp = DDP(model, device_ids=[torch.cuda.current_device()], bucket_cap_mb=1)
    options = {"momentum": 0.9, "clip_norm": 5.0, "value_dtype": "fp16"}
    state = raytopk.TopKState(ratio=0.01, start_iter=0, exchange=exchange, module=model, **options)
    ddp.register_comm_hook(state, raytopk.topk_hook)
    x, y = torch.randn(32, 256, device="cuda"), torch.randint(10, (32,), device="cuda")
    waited = [_host_waited_for_the_gpu(ddp, x, y) for _ in range(5)]
    assert not any(waited[2:]), f"{exchange}: the host waited for the GPU at steps {waited}"
    assert set(state.algorithms) == {exchange}, state.algorithms


@pytest.mark.parametrize("exchange, world_size, local", gpu_exchanges.LAYOUTS)
def test_every_exchange_with_ranks_sharing_the_gpu_is_lossless_and_trains_as_on_cpu(exchange, world_size, local):
    """Several processes on one GPU over gloo (NCCL refuses two ranks on a device): see benchmarks/gpu_exchanges.py."""
    row = gpu_exchanges.check(exchange, world_size, local, "cuda")
    assert row["lossless"] and row["matches_cpu"], row


def _the_gpu_jobs_exchange(gpus_per_node: int):
    """What ``auto`` picks for jobs/cifar10_resnet50_gpu.yaml's ResNet-50 buckets, its workers on nodes of
    ``gpus_per_node``: ``(exchange, workers)``."""
    from raytopk.compression import VALUE_DTYPES
    from raytopk.config import load_config
    from raytopk.cost_model import Layout, budget, choose

    job = load_config(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "cifar10_resnet50_gpu.yaml")
    )
    options = job.compression(steps_per_epoch=1)
    numel = 25 * 2**20 // 4  # DDP's 25 MB buckets of fp32 gradients
    k, value_bytes = budget(options.ratio, numel, job.workers), VALUE_DTYPES[options.value_dtype].itemsize
    layout = Layout(job.workers, gpus_per_node)
    picked = choose(layout, numel, k, value_bytes, options.link, options.capacity_factor, options.keep_factor)
    return picked, job.workers


@pytest.mark.parametrize("gpus_per_node", [1, 4])  # cluster.yaml's node types gpu_1x and gpu_4x
def test_the_gpu_jobs_exchange_runs_on_cuda(gpus_per_node):
    """The exchange that jobs/cifar10_resnet50_gpu.yaml gets on cluster.yaml's nodes, its workers as ranks sharing
    this GPU: lossless, and training as on the CPU."""
    exchange, workers = _the_gpu_jobs_exchange(gpus_per_node)
    row = gpu_exchanges.check(exchange, workers, gpus_per_node, "cuda")
    assert row["lossless"] and row["matches_cpu"], row
