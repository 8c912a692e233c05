"""Count the bytes really sent on the network by dense DDP and by the raytopk hook.

What is measured: two gloo workers train torchvision's ResNet-18 (10 classes,
11.2M parameters) with DDP, once per method: dense (DDP's own allreduce), then
``raytopk.topk_hook`` at ratio 0.01 and 0.001 with fp32 and fp16 values. After
the hook's dense warm-up steps (``start_iter``), the bytes the loopback
interface transmits during ``--steps`` training steps are read from
``/sys/class/net/lo/statistics/tx_bytes``, with a barrier before the first read
and before the last, so only those steps count. Loopback counts each packet
once, so this is every byte both workers put on the wire: payload, gloo
framing, TCP/IP headers and ACKs, and DDP's per-step broadcast of the
BatchNorm buffers. The hook's own payload count (``state.stats["bytes_sent"]``,
summed over workers) is shown next to it; for dense, that column is the
gradient size times the number of workers.

How: the script must run as root. It reruns itself in a private network
namespace (``benchmarks/netns.py``), so nothing else adds to the counter, and
workers talk over TCP on 127.0.0.1 there. With ``--rate 1gbit`` the
namespace's loopback is shaped with ``tc ... tbf``; unshaped (the default),
step time is mostly compute. ``benchmarks/link.py`` is the step-time benchmark.

Reproduce (from the repository root, as root)::

    python benchmarks/wire.py

Results go to ``benchmarks/results/wire.json``.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from netns import read_tx_bytes, reexec_in_namespace, shape
from raytopk.storage import write_json

COMMAND = "python benchmarks/wire.py"
WORLD_SIZE = 2
WARMUP_STEPS = 2  # the hook's start_iter: dense steps that stay out of the count
BATCH_SIZE = 16
MODEL = "torchvision resnet18(num_classes=10), input 3x32x32"
# (name, ratio, value_dtype); ratio None means DDP's own dense allreduce.
METHODS = [
    ("dense", None, None),
    ("topk 0.01 fp32", 0.01, "fp32"),
    ("topk 0.01 fp16", 0.01, "fp16"),
    ("topk 0.001 fp32", 0.001, "fp32"),
    ("topk 0.001 fp16", 0.001, "fp16"),
]


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def worker(rank: int, port: int, method: tuple, steps: int, results) -> None:
    """One DDP worker: warm up, then count loopback bytes over ``steps`` steps."""
    _, ratio, value_dtype = method
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    model = build_model()
    ddp = DDP(model)
    state = None
    if ratio is not None:
        state = raytopk.TopKState(ratio=ratio, value_dtype=value_dtype, start_iter=WARMUP_STEPS, module=model)
        ddp.register_comm_hook(state, raytopk.topk_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(BATCH_SIZE, 3, 32, 32, generator=generator)
    labels = torch.randint(10, (BATCH_SIZE,), generator=generator)

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(ddp(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - started

    for _ in range(WARMUP_STEPS):
        step()
    dist.barrier()
    tx_before = read_tx_bytes()
    sent_before = state.stats["bytes_sent"] if state else 0
    times = [step() for _ in range(steps)]
    dist.barrier()
    tx_after = read_tx_bytes()
    if state:
        sent = state.stats["bytes_sent"] - sent_before
    else:  # what dense DDP hands its allreduce: every gradient, each step
        sent = steps * sum(p.numel() * p.element_size() for p in model.parameters())
    results.put({"rank": rank, "tx_bytes": tx_after - tx_before, "payload_bytes": sent, "step_s": times})
    dist.destroy_process_group()


def measure(method: tuple, port: int, steps: int) -> dict:
    """Run one method on WORLD_SIZE fresh workers; bytes and times per measured step."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(port, method, steps, results), nprocs=WORLD_SIZE, join=True)
    ranks = sorted((results.get() for _ in range(WORLD_SIZE)), key=lambda r: r["rank"])
    return {
        "method": method[0],
        "ratio": method[1],
        "value_dtype": method[2],
        # The counter is namespace-wide: rank 0's reading covers both workers.
        "wire_bytes_per_step": ranks[0]["tx_bytes"] / steps,
        "payload_bytes_per_step": sum(r["payload_bytes"] for r in ranks) / steps,
        "median_step_s": statistics.median(ranks[0]["step_s"]),
    }


def run_in_namespace(args) -> None:
    """The measurement proper; runs inside the private network namespace."""
    shape(args.rate)
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    rows = [measure(method, 29500 + i, args.steps) for i, method in enumerate(METHODS)]
    dense = rows[0]["wire_bytes_per_step"]
    for row in rows:
        row["percent_of_dense"] = 100 * row["wire_bytes_per_step"] / dense

    print(f"\n{MODEL}, {params:,} parameters, {WORLD_SIZE} workers, {args.steps} steps, "
          f"loopback {'shaped to ' + args.rate if args.rate else 'unshaped'}; "
          f"wire bytes include DDP's {buffer_bytes:,} B/step BatchNorm buffer broadcast\n")
    print("| method | wire MB/step | % of dense | payload MB/step | median step s |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['wire_bytes_per_step'] / 1e6:.3f} | {row['percent_of_dense']:.2f} | "
              f"{row['payload_bytes_per_step'] / 1e6:.3f} | {row['median_step_s']:.3f} |")

    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "model": MODEL,
            "parameters": params,
            "buffer_bytes_broadcast_per_step": buffer_bytes,
            "world_size": WORLD_SIZE,
            "backend": "gloo over TCP on loopback, private network namespace",
            "batch_size_per_worker": BATCH_SIZE,
            "warmup_steps": WARMUP_STEPS,
            "steps": args.steps,
            "rate": args.rate,
            "results": rows,
        },
    )
    print(f"\nwrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per method, after the warm-up")
    parser.add_argument("--rate", help="shape loopback with tc tbf to this rate, e.g. 1gbit (default: unshaped)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "wire.json"))
    args = parser.parse_args()
    reexec_in_namespace("wire")
    run_in_namespace(args)


if __name__ == "__main__":
    main()
