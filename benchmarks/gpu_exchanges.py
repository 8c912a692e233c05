"""Every exchange with several ranks on one device: lossless, and the same training as on the CPU.

For each exchange and layout (all-gather and sharded with 2 and 4 ranks, hierarchical as 2 nodes
of 2), ranks join a gloo group with their tensors on ``--device``: processes that share one GPU
need gloo, as NCCL refuses two ranks on a device, and raytopk stages gloo's collectives of CUDA
tensors through pinned host memory. Each layout checks:

1. ``lossless``: integer-valued buckets (every sum exact, in any order) exchanged once, fp32 and
   fp16 values: on every rank the same update, and the residuals plus the update are everything
   accumulated, bit for bit.
2. ``matches_cpu``: six DDP steps of a small float64 MLP with the hook (the exchange forced,
   momentum correction on, a dense warm-up step) on the device, then the same on the CPU, from the
   same weights and data: the weights agree to 1e-9 (float64, so the two devices' roundings
   cannot change which entries are selected).

Run by ``benchmarks/gpu_check.sh``, which puts the rows into ``gpu_check.json`` as ``exchanges``;
``--device cpu`` checks this script on a machine without a GPU::

    python benchmarks/gpu_exchanges.py --device cpu --output /tmp/exchanges.json
"""

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

# (exchange, ranks, ranks per node)
LAYOUTS = [("allgather", 2, 1), ("allgather", 4, 1), ("sharded", 2, 1), ("sharded", 4, 1), ("hierarchical", 4, 2)]


def _lossless(rank: int, world_size: int, exchange: str, device: torch.device) -> bool:
    from raytopk.cost_model import Link
    from raytopk.exchange import Exchanger

    exchanger = Exchanger(exchange, dist.group.WORLD, Link(), 1.0)
    for seed, (numel, k, dtype) in enumerate(
        [(1000, 40, torch.float32), (997, 7, torch.float16), (64, 64, torch.float32)]
    ):
        g = torch.Generator().manual_seed(seed * 100 + rank)
        acc = torch.randint(-60, 61, (numel,), generator=g).float().to(device)
        total, out = _summed(acc), torch.zeros_like(acc)
        exchanger.run(exchange, acc, k, dtype, out).future.wait()
        everyone = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(everyone, out)
        if not all(torch.equal(other, out) for other in everyone) or not torch.equal(_summed(acc) + out, total):
            return False
    return True


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor)
    return torch.stack(everyone).sum(0)


def _trained(rank: int, exchange: str, device: torch.device) -> torch.Tensor:
    import raytopk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).double().to(device)
    ddp = DDP(model, bucket_cap_mb=1)
    state = raytopk.TopKState(ratio=0.05, start_iter=1, module=model, exchange=exchange, momentum=0.9)
    ddp.register_comm_hook(state, raytopk.topk_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(16, 32, generator=g).double().to(device), torch.randint(0, 10, (16,), generator=g).to(device)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def _rank(rank: int, world_size: int, store: str, exchange: str, local: int, device_name: str, results) -> None:
    os.environ.update(LOCAL_WORLD_SIZE=str(local), LOCAL_RANK=str(rank % local), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        lossless = _lossless(rank, world_size, exchange, device)
        matches = torch.allclose(
            _trained(rank, exchange, device), _trained(rank, exchange, torch.device("cpu")), rtol=0, atol=1e-9
        )
        results.put((rank, lossless, bool(matches), None))
    except Exception as error:  # a collective gloo refuses for this device, say: the row says which, the run goes on
        results.put((rank, False, False, f"{type(error).__name__}: {error}"))
    finally:
        dist.destroy_process_group()


def check(exchange: str, world_size: int, local: int, device: str) -> dict:
    """One row: ``exchange`` on ``world_size`` ranks (``local`` per node), tensors on ``device``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(
                target=_rank, args=(r, world_size, os.path.join(tmp, "store"), exchange, local, device, results)
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    errors = sorted({error for *_, error in got if error})
    return {
        "exchange": exchange,
        "ranks": world_size,
        "nodes": world_size // local,
        "device": device,
        "lossless": all(ok for _, ok, _, _ in got),
        "matches_cpu": all(ok for _, _, ok, _ in got),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--output", required=True, help="a JSON file; its 'exchanges' key gets the rows (other keys are kept)"
    )
    args = parser.parse_args()
    rows = [check(exchange, world_size, local, args.device) for exchange, world_size, local in LAYOUTS]
    report = json.load(open(args.output)) if os.path.exists(args.output) else {}
    report["exchanges"] = rows
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print("| exchange | ranks | nodes | device | lossless | matches CPU |")
    print("|---|---:|---:|---|:---:|:---:|")
    for r in rows:
        print(
            f"| {r['exchange']} | {r['ranks']} | {r['nodes']} | {r['device']} | {r['lossless']} | {r['matches_cpu']} |"
            + (f" {'; '.join(r['errors'])}" if r["errors"] else "")
        )
    sys.exit(0 if all(r["lossless"] and r["matches_cpu"] for r in rows) else 1)


if __name__ == "__main__":
    main()
