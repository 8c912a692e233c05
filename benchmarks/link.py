"""Gradient exchange time per step on an emulated link: dense DDP, fp16, PowerSGD and raytopk side by side.

What is measured: DDP workers (gloo over TCP) whose model has exactly the
parameter shapes of torchvision's ResNet-18 (11.7M) or ResNet-50 (25.6M) and a
loss whose gradient is a fixed random tensor, so a step is almost nothing but
the gradient exchange: DDP's buckets, the communication hook (selection,
packing, error feedback included) and the collectives. Every method runs DDP
with ``gradient_as_bucket_view=True`` (gradients live in the buckets, no copies
in and out), as raytopk's training loop does. For each link rate,
worker count, model and method, the median time of ``backward()`` over
``--steps`` steps after the warm-up, minus the same model's median
``backward()`` without DDP (the compute floor, measured in the same run), is
the exchange time. The bytes the namespace's loopback sent during those steps
give the wire bytes; ``floor`` is wire bytes / link rate, the time the link
needs for them at best, and ``x floor`` how far the exchange is from it.

Methods: dense DDP (fp32 allreduce), PyTorch's ``fp16_compress_hook``,
PyTorch's PowerSGD hook at ranks 1 and 4, and raytopk at ratios 0.01 and 0.001
with fp32 and fp16 values. PowerSGD launches collectives from future callbacks,
which on gloo reach the ranks in different orders once a model has several
buckets (torch 2.14.1 fails with "Received data size doesn't match expected
size"); it runs here with one bucket holding every gradient (``bucket_cap_mb``
above the model size), and the table says so. Every method gets the same
number of dense warm-up steps (PowerSGD's ``start_powerSGD_iter``, raytopk's
``start_iter``), none of which are timed.

The link: a private network namespace whose loopback is shaped with ``tc ...
tbf`` (``benchmarks/netns.py``); every worker shares it, so the rate caps the
sum of their traffic. Run as root, from the repository root::

    python benchmarks/link.py

Results: ``benchmarks/results/link.json`` and ``benchmarks/results/link.png``.
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from raytopk.storage import write_figure, write_json

from netns import read_tx_bytes, reexec_in_namespace, shape

COMMAND = "python benchmarks/link.py"
WARMUP_STEPS = 2  # the fewest PowerSGD allows; DDP rebuilds its buckets after the first
MODELS = {"resnet18": lambda: torchvision.models.resnet18(), "resnet50": lambda: torchvision.models.resnet50()}
RATES = ["1gbit", "10gbit", None]  # None: unshaped loopback
RATE_BITS = {"1gbit": 1e9, "10gbit": 1e10}
# name -> (hook kind, its setting, value dtype)
METHODS = {
    "dense fp32": ("dense", None, None),
    "fp16_compress_hook": ("fp16", None, None),
    "PowerSGD rank 1 (one bucket)": ("powersgd", 1, None),
    "PowerSGD rank 4 (one bucket)": ("powersgd", 4, None),
    "raytopk 0.01 fp32": ("topk", 0.01, "fp32"),
    "raytopk 0.01 fp16": ("topk", 0.01, "fp16"),
    "raytopk 0.001 fp32": ("topk", 0.001, "fp32"),
    "raytopk 0.001 fp16": ("topk", 0.001, "fp16"),
}


class GradientShapes(torch.nn.Module):
    """A model's parameters (``MODELS[name]``) and a loss whose gradient is a fixed random tensor per parameter."""

    def __init__(self, name: str, device: torch.device = torch.device("cpu")):
        super().__init__()
        shapes = [p.shape for p in MODELS[name]().parameters()]
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes)
        generator = torch.Generator(device=device).manual_seed(0)
        # A plain list, not buffers: DDP would broadcast buffers every forward and add to the wire.
        self.gradients = [torch.randn(s, device=device, generator=generator) for s in shapes]

    def forward(self) -> torch.Tensor:
        return sum((p * g).sum() for p, g in zip(self.params, self.gradients))


def register(ddp: DDP, model: torch.nn.Module, method: str):
    kind, setting, value_dtype = METHODS[method]
    if kind == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=setting, start_powerSGD_iter=WARMUP_STEPS
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif kind == "topk":
        state = raytopk.TopKState(ratio=setting, start_iter=WARMUP_STEPS, value_dtype=value_dtype, module=model)
        ddp.register_comm_hook(state, raytopk.topk_hook)


def median_backward_s(model: torch.nn.Module, steps: int) -> float:
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model()
        started = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def worker(rank: int, world_size: int, port: int, model_name: str, method: str, steps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = GradientShapes(model_name)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    one_bucket = METHODS[method][0] == "powersgd"
    ddp = DDP(model, bucket_cap_mb=math.ceil(size_mb) + 1 if one_bucket else 25, gradient_as_bucket_view=True)
    register(ddp, model, method)
    median_backward_s(ddp, WARMUP_STEPS)
    dist.barrier()
    tx_before = read_tx_bytes()
    step_s = median_backward_s(ddp, steps)
    dist.barrier()
    tx = read_tx_bytes() - tx_before
    results.put({"rank": rank, "step_s": step_s, "tx_bytes": tx})
    dist.destroy_process_group()


def measure(world_size: int, model_name: str, method: str, steps: int, port: int) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(worker, args=(world_size, port, model_name, method, steps, results), nprocs=world_size, join=True)
    except Exception as err:  # a method that crashes is a result too
        return {"error": str(err).strip().splitlines()[-1][:200]}
    ranks = [results.get() for _ in range(world_size)]
    return {
        "step_s": max(r["step_s"] for r in ranks),  # the step ends when the slowest rank has its gradient
        # Barriers and the counter are namespace-wide: one reading covers every worker.
        "wire_bytes_per_step": ranks[0]["tx_bytes"] / steps,
    }


def compute_floor_s(model_name: str, steps: int) -> float:
    torch.set_num_threads(1)
    return median_backward_s(GradientShapes(model_name), steps)


def run(args) -> list:
    rows, port = [], 29600
    floors = {name: compute_floor_s(name, args.steps) for name in args.models}
    for rate in args.rates:
        shape(None if rate == "unshaped" else rate)
        for world_size in args.workers:
            for model_name in args.models:
                for method in args.methods:
                    port += 1
                    row = {
                        "rate": rate,
                        "workers": world_size,
                        "model": model_name,
                        "method": method,
                        **measure(world_size, model_name, method, args.steps, port),
                    }
                    if "error" not in row:
                        row["exchange_s"] = max(row["step_s"] - floors[model_name], 0.0)
                        bits = RATE_BITS.get(rate)
                        row["floor_s"] = row["wire_bytes_per_step"] * 8 / bits if bits else None
                        row["x_floor"] = row["exchange_s"] / row["floor_s"] if bits else None
                    rows.append(row)
                    print(_line(row), flush=True)
    shape(None)
    return rows, floors


def _line(row: dict) -> str:
    head = f"| {row['rate']} | {row['workers']} | {row['model']} | {row['method']} |"
    if "error" in row:
        return f"{head} fails: {row['error']} | | | |"
    floor = f"{row['x_floor']:.2f}" if row["x_floor"] is not None else "-"
    return f"{head} {1000 * row['exchange_s']:.1f} | {row['wire_bytes_per_step'] / 1e6:.2f} | {floor} |"


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["workers"]) for r in rows})
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.2 * len(panels), 8.5), 5), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    colors = plt.cm.tab10.colors
    for ax, (model_name, world_size) in zip(axes[0], panels):
        for j, method in enumerate(methods):
            values = []
            for rate in rates:
                match = [
                    r
                    for r in rows
                    if (r["model"], r["workers"], r["rate"], r["method"]) == (model_name, world_size, rate, method)
                ]
                values.append(1000 * match[0]["exchange_s"] if match and "exchange_s" in match[0] else float("nan"))
            ax.bar(
                [i + (j - len(methods) / 2 + 0.5) * width for i in range(len(rates))],
                values,
                width,
                label=method,
                color=colors[j % len(colors)],
            )
        ax.set_xticks(range(len(rates)), rates)
        ax.set_yscale("log")
        ax.set_title(f"{model_name}-sized gradients, {world_size} workers")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("gradient exchange per step (ms, log scale)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Step time spent exchanging gradients on a shaped loopback link (gloo, one thread per worker)")
    fig.tight_layout()
    write_figure(path, fig, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run, after the warm-up")
    parser.add_argument("--rates", nargs="+", default=[r or "unshaped" for r in RATES])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "link.json"))
    args = parser.parse_args()
    reexec_in_namespace("link")

    print("| link | workers | gradients | method | exchange ms/step | wire MB/step | x floor |")
    print("|---|---:|---|---|---:|---:|---:|")
    rows, floors = run(args)
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "cpu_threads_per_worker": 1,
            "cores": os.cpu_count(),
            "warmup_steps": WARMUP_STEPS,
            "steps": args.steps,
            "compute_floor_s": floors,
            "parameters": {name: sum(p.numel() for p in MODELS[name]().parameters()) for name in args.models},
            "results": rows,
        },
    )
    plot(rows, os.path.splitext(args.output)[0] + ".png")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
