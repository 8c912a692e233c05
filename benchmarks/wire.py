"""Count the bytes really sent on the network by dense DDP and by the raytopk hook, at 2, 4 and 8 workers.

What is measured: gloo workers train ``Linear(2048, 2048)`` (4.2M parameters,
16.8 MB of fp32 gradient) with DDP, once per method and worker count: dense
(DDP's own ring allreduce), then ``raytopk.topk_hook`` at ratio 0.01 with the
default exchange (``auto``), with ``exchange="allgather"`` forced, with fp16
values, and at ratio 0.001. After the hook's dense warm-up steps
(``start_iter``), the bytes the loopback interface transmits during ``--steps``
training steps are read from ``/sys/class/net/lo/statistics/tx_bytes``, with a
barrier before the first read and before the last, so only those steps count.
Loopback counts each packet once, so this is every byte all workers put on the
wire: payload, gloo framing, TCP/IP headers and ACKs.

Next to it: what raytopk counts (``state.stats["bytes_sent"]``, summed over
workers: each collective's standard cost, e.g. a ring all-gather sends
``W - 1`` payloads per worker), and for dense, what DDP's ring allreduce sends
(``2 (W - 1) / W`` of the gradient per worker), which is also what the hook
counts as ``dense_bytes``. Every worker counts as its own node (no
``LOCAL_WORLD_SIZE``), so ``auto`` chooses between all-gather and sharded.

How: the script must run as root. It reruns itself in a private network
namespace (``benchmarks/netns.py``), so nothing else adds to the counter, and
workers talk over TCP on 127.0.0.1 there, unshaped: only bytes are measured
here (``benchmarks/multinode.py`` measures time on shaped links).

Reproduce (from the repository root, as root)::

    python benchmarks/wire.py

Results go to ``benchmarks/results/wire.json``.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from raytopk.exchange import dense_allreduce_bytes
from raytopk.storage import write_json

from netns import read_tx_bytes, reexec_in_namespace, shape

COMMAND = "python benchmarks/wire.py"
WORLD_SIZES = [2, 4, 8]
WARMUP_STEPS = 2  # the hook's start_iter: dense steps that stay out of the count
BATCH_SIZE = 4
MODEL = "torch.nn.Linear(2048, 2048), MSE loss"
# (name, ratio, value_dtype, exchange); ratio None means DDP's own dense allreduce.
METHODS = [
    ("dense", None, None, None),
    ("topk 0.01", 0.01, "fp32", "auto"),
    ("topk 0.01 allgather", 0.01, "fp32", "allgather"),
    ("topk 0.01 fp16", 0.01, "fp16", "auto"),
    ("topk 0.001", 0.001, "fp32", "auto"),
]


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(2048, 2048)


def worker(rank: int, world_size: int, port: int, method: tuple, steps: int, results) -> None:
    """One DDP worker: warm up, then count loopback bytes over ``steps`` steps."""
    _, ratio, value_dtype, exchange = method
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = build_model()
    ddp = DDP(model)
    state = None
    if ratio is not None:
        state = raytopk.TopKState(ratio=ratio, value_dtype=value_dtype, start_iter=WARMUP_STEPS, exchange=exchange)
        ddp.register_comm_hook(state, raytopk.topk_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH_SIZE, 2048, generator=generator), torch.randn(BATCH_SIZE, 2048, generator=generator)

    def step() -> None:
        optimizer.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    dist.barrier()
    tx_before = read_tx_bytes()
    sent_before = state.stats["bytes_sent"] if state else 0
    for _ in range(steps):
        step()
    dist.barrier()
    tx_after = read_tx_bytes()
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if state:
        sent = state.stats["bytes_sent"] - sent_before
    else:  # what dense DDP's ring allreduce sends: 2 (W - 1) / W of every gradient, each step
        sent = steps * dense_allreduce_bytes(gradient_bytes, world_size)
    results.put(
        {
            "rank": rank,
            "tx_bytes": tx_after - tx_before,
            "counted_bytes": sent,
            "exchange": sorted(state.algorithms) if state else ["dense"],
        }
    )
    dist.destroy_process_group()


def measure(method: tuple, world_size: int, port: int, steps: int) -> dict:
    """Run one method on ``world_size`` fresh workers; bytes per measured step, over every worker."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world_size, port, method, steps, results), nprocs=world_size, join=True)
    ranks = sorted((results.get() for _ in range(world_size)), key=lambda r: r["rank"])
    wire = ranks[0]["tx_bytes"] / steps  # the counter is namespace-wide: one reading covers every worker
    counted = sum(r["counted_bytes"] for r in ranks) / steps
    return {
        "method": method[0],
        "ratio": method[1],
        "value_dtype": method[2],
        "workers": world_size,
        "exchange": ranks[0]["exchange"],
        "wire_bytes_per_step": wire,
        "counted_bytes_per_step": counted,
        "counted_over_wire": counted / wire,
    }


def run_in_namespace(args) -> None:
    """The measurement proper; runs inside the private network namespace."""
    shape(None)
    params = sum(p.numel() for p in build_model().parameters())
    rows = []
    for world_size in args.workers:
        for i, method in enumerate(METHODS):
            rows.append(measure(method, world_size, 29500 + 10 * world_size + i, args.steps))

    def find(workers, method):
        return next(r for r in rows if r["workers"] == workers and r["method"] == method)

    for row in rows:
        row["percent_of_dense"] = (
            100 * row["wire_bytes_per_step"] / find(row["workers"], "dense")["wire_bytes_per_step"]
        )
    for row in rows:  # how the share grows with the worker count
        row["share_over_fewest_workers"] = (
            row["percent_of_dense"] / find(min(args.workers), row["method"])["percent_of_dense"]
        )

    print(f"\n{MODEL}, {params:,} parameters, {args.steps} steps, loopback unshaped, every worker its own node\n")
    print(
        f"| workers | method | exchange | wire MB/step | % of dense | share / {min(args.workers)} workers' "
        "| counted MB/step | counted / wire |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['method']} | {'+'.join(row['exchange'])} | "
            f"{row['wire_bytes_per_step'] / 1e6:.3f} | {row['percent_of_dense']:.2f} | "
            f"{row['share_over_fewest_workers']:.2f} | {row['counted_bytes_per_step'] / 1e6:.3f} | "
            f"{row['counted_over_wire']:.3f} |"
        )

    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "model": MODEL,
            "parameters": params,
            "backend": "gloo over TCP on loopback, private network namespace, unshaped",
            "batch_size_per_worker": BATCH_SIZE,
            "warmup_steps": WARMUP_STEPS,
            "steps": args.steps,
            "results": rows,
        },
    )
    print(f"\nwrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per method, after the warm-up")
    parser.add_argument("--workers", type=int, nargs="+", default=WORLD_SIZES, help="worker counts (default 2 4 8)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "wire.json"))
    args = parser.parse_args()
    reexec_in_namespace("wire")
    run_in_namespace(args)


if __name__ == "__main__":
    main()
