"""Time selection and the hook on a GPU: select_topk against torch.topk, the PyTorch radix select and one memory pass.

What is measured, on ``--device`` (default ``cuda``), for float32 tensors of
25M and 100M elements and k = 1%: the median time of ``x.abs()`` (one read and
one write of the tensor), ``torch.topk(x.abs(), k)``,
``raytopk.compression.select_topk(x, k)`` (on a GPU with Triton: the radix
select of ``raytopk.triton_kernels``, a few passes over memory) and the same
radix select written as PyTorch calls (``_topk_by_radix_select``, the path
without Triton), each synchronized; whether select_topk picks the same set
as torch.topk, and the same values and indices as the PyTorch radix select,
bit for bit. Then a one-rank process group (NCCL on a GPU, gloo on CPU) runs
DDP over ResNet-50's parameter shapes with a fixed random gradient
(``link.GradientShapes``), dense and with ``raytopk.topk_hook`` at 0.01, and
reports the median step time of each and the hook's compute time (the CPU
time of its calls: on a GPU, launching).

Run by ``benchmarks/gpu_check.sh``; ``--device cpu`` checks the script itself
on a machine without a GPU. Results go to ``benchmarks/results/gpu_check.json``.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from raytopk import triton_kernels
from raytopk.compression import _topk_by_radix_select, select_topk
from raytopk.storage import write_json

from link import GradientShapes

COMMAND = "bash benchmarks/gpu_check.sh"


def median_s(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def selection_rows(device: torch.device, sizes, repeats: int) -> list:
    rows = []
    for n in sizes:
        x = torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(n))
        k = n // 100
        values, chosen = select_topk(x, k)
        radix_values, radix_chosen = _topk_by_radix_select(x, k)
        _, expected = torch.topk(x.abs(), k, sorted=False)
        row = {
            "numel": n,
            "k": k,
            "kernels": "triton" if triton_kernels.usable(x) else "pytorch",
            "abs_ms": 1e3 * median_s(lambda x=x: x.abs(), device, repeats),
            "torch_topk_ms": 1e3 * median_s(lambda x=x: torch.topk(x.abs(), k, sorted=False), device, repeats),
            "select_topk_ms": 1e3 * median_s(lambda x=x: select_topk(x, k), device, repeats),
            "pytorch_radix_select_ms": 1e3 * median_s(lambda x=x: _topk_by_radix_select(x, k), device, repeats),
            "exact": torch.equal(chosen.long().sort().values, expected.sort().values),
            "matches_pytorch_path": torch.equal(chosen, radix_chosen) and torch.equal(values, radix_values),
        }
        rows.append(row)
        del x
    return rows


def hook_row(device: torch.device, steps: int) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29650")
    dist.init_process_group(backend, rank=0, world_size=1)
    row = {"backend": backend}
    # Dense DDP, the hook, and the hook on its PyTorch path: (the row's keys, RAYTOPK_TRITON).
    variants = [
        (("dense_step_ms", None), "1"),
        (("topk_step_ms", "hook_ms_per_step"), "1"),
        (("pytorch_path_step_ms", "pytorch_path_hook_ms_per_step"), "0"),
    ]
    for (step_key, hook_key), triton_setting in variants:
        compress = hook_key is not None
        os.environ["RAYTOPK_TRITON"] = triton_setting
        model = GradientShapes("resnet50", device)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        # No device_ids: the module already lives on its one device, and DDP would try to move the (absent) inputs.
        ddp = DDP(model, gradient_as_bucket_view=True)
        state = raytopk.TopKState(ratio=0.01, start_iter=2, module=model) if compress else None
        if state is not None:
            ddp.register_comm_hook(state, raytopk.topk_hook)

        def step():
            ddp.zero_grad(set_to_none=True)
            ddp().backward()

        for _ in range(3):
            step()
        hook_before = state.stats["hook_s"] if state else 0.0
        row[step_key] = 1e3 * median_s(step, device, steps)
        if compress:
            row[hook_key] = 1e3 * (state.stats["hook_s"] - hook_before) / (steps + 1)
    del os.environ["RAYTOPK_TRITON"]
    dist.destroy_process_group()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "gpu_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    rows = selection_rows(device, args.sizes, args.repeats)
    hook = hook_row(device, args.repeats)
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "device": name,
            "selection": rows,
            "hook": hook,
        },
    )
    print(f"\n{name}, torch {torch.__version__}, k = 1% of n, median of {args.repeats}")
    print("| n | abs ms | torch.topk ms | select_topk ms | PyTorch radix ms | select/abs | kernels | exact |")
    print("|---:|---:|---:|---:|---:|---:|:---:|:---:|")
    for r in rows:
        print(
            f"| {r['numel']:,} | {r['abs_ms']:.3f} | {r['torch_topk_ms']:.3f} | {r['select_topk_ms']:.3f} | "
            f"{r['pytorch_radix_select_ms']:.3f} | {r['select_topk_ms'] / r['abs_ms']:.2f} | {r['kernels']} | "
            f"{r['exact'] and r['matches_pytorch_path']} |"
        )
    print(
        f"\nDDP over ResNet-50 shapes ({hook['parameters']:,} parameters), 1 rank, {hook['backend']}: step "
        f"dense {hook['dense_step_ms']:.2f} ms, raytopk 0.01 {hook['topk_step_ms']:.2f} ms "
        f"(hook compute {hook['hook_ms_per_step']:.2f} ms/step); on the PyTorch path "
        f"{hook['pytorch_path_step_ms']:.2f} ms (hook {hook['pytorch_path_hook_ms_per_step']:.2f} ms/step)"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
