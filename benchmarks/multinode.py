"""Several nodes on one machine: each a network namespace whose card is a shaped veth into a bridge.

What is measured, for each layout (nodes x ranks per node: 2x2, 4x1, 4x2):

1. **Exchanges alone.** Every rank holds a synthetic bucket of ``--numel``
   fp32 entries (normal noise) and exchanges its top ``--ratio`` with
   ``raytopk.exchange``'s all-gather, sharded and hierarchical algorithms, and
   as dense DDP would (one ``all_reduce``). Median time over repetitions (the
   slowest rank's), bytes each rank counted, and the bytes the namespaces'
   counters saw (every node's ``eth0`` and ``lo``), against
   :func:`raytopk.exchange.cost` with this network's figures.
2. **Training steps.** DDP on ``Linear(1024, 1024)`` (1.05M parameters,
   4.2 MB of gradient), batch 32 per rank, SGD: dense DDP, then the raytopk
   hook at ``--ratio`` with ``exchange="allgather"``, ``"sharded"``,
   ``"hierarchical"`` and the default ``"auto"``. Median step time.

Ranks learn their node layout as under torchrun or Ray Train, from
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. Gloo talks TCP: between nodes over the
shaped cards (``--rate``, 100 Mbit/s by default), inside a node over its
loopback. Up to 8 ranks share this machine's CPU cores, so the link must stay
the bottleneck: at 100 Mbit/s dense DDP's 4.2 MB ring allreduce takes about
0.6 s a step and top-k's exchange tens of milliseconds, against a few
milliseconds of compute per rank; the results record step times with which to
check this.

Reproduce (from the repository root, as root)::

    python benchmarks/multinode.py

Results go to ``benchmarks/results/multinode.json`` and ``multinode.png``.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMAND = "python benchmarks/multinode.py"
LAYOUTS = [(2, 2), (4, 1), (4, 2)]  # (nodes, ranks per node)
EXCHANGES = ["dense", "allgather", "sharded", "hierarchical"]
HOOK_METHODS = ["dense", "allgather", "sharded", "hierarchical", "auto"]
PORT = 29700


# -- one rank (runs inside a node namespace) -------------------------------------------


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import raytopk
    from netns import read_node_tx_bytes
    from raytopk.compression import select_topk
    from raytopk.exchange import Exchanger, Link

    torch.set_num_threads(1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank, world_size=world_size)
    link = Link(inter_gbps=args.gbps, inter_latency_us=args.latency_us)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def counters():
        dist.barrier()
        mine = read_node_tx_bytes() if local_rank == 0 else {"between_nodes": 0, "inside_node": 0}
        t = torch.tensor([mine["between_nodes"], mine["inside_node"]], dtype=torch.float64)
        dist.all_reduce(t)
        return t

    report = {"exchanges": {}, "steps": {}}
    # 1. exchanges alone
    k = math.ceil(args.ratio * args.numel)
    bucket = torch.randn(args.numel, generator=torch.Generator().manual_seed(rank))
    for algorithm in EXCHANGES:
        exchanger = None if algorithm == "dense" else Exchanger(algorithm, dist.group.WORLD, link, 1.25)
        times, sent = [], 0
        before = None
        for rep in range(args.warmup + args.reps):
            if rep == args.warmup:
                before, sent = counters(), 0
            acc, out = bucket.clone(), torch.zeros_like(bucket)
            dist.barrier()
            started = time.perf_counter()
            if exchanger is None:
                dist.all_reduce(acc)
                rep_sent = 2 * (world_size - 1) / world_size * acc.numel() * 4
            elif algorithm == "allgather":
                values, indices = select_topk(acc, k)
                future, rep_sent = raytopk.exchange.allgather(acc, values, indices, torch.float32, dist.group.WORLD, out)
                future.wait()
            else:
                future, rep_sent = exchanger.run(algorithm, acc, k, torch.float32, out)
                future.wait()
            elapsed = slowest(time.perf_counter() - started)
            if rep >= args.warmup:
                times.append(elapsed)
                sent += rep_sent
        wire = counters() - before
        counted = torch.tensor([float(sent)])
        dist.all_reduce(counted)
        report["exchanges"][algorithm] = {
            "median_s": statistics.median(times),
            "counted_bytes_per_exchange": float(counted) / args.reps,
            "wire_bytes_between_nodes_per_exchange": float(wire[0]) / args.reps,
            "wire_bytes_inside_nodes_per_exchange": float(wire[1]) / args.reps,
        }

    # 2. training steps
    for method in HOOK_METHODS:
        torch.manual_seed(0)
        model = torch.nn.Linear(1024, 1024)
        ddp = DDP(model)
        state = None
        if method != "dense":
            state = raytopk.TopKState(ratio=args.ratio, start_iter=2, exchange=method, link=link)
            ddp.register_comm_hook(state, raytopk.topk_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(32, 1024, generator=g), torch.randn(32, 1024, generator=g)
        times = []
        for step in range(args.warmup + 2 + args.steps):
            dist.barrier()
            started = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            elapsed = slowest(time.perf_counter() - started)
            if step >= args.warmup + 2:
                times.append(elapsed)
        report["steps"][method] = {
            "median_step_s": statistics.median(times),
            "exchange_chosen": sorted(state.algorithms) if state else ["dense"],
        }
    if rank == 0:
        with open(args.report, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


# -- the driver (root, outside every namespace) ---------------------------------------


def run_layout(nodes: int, local: int, args) -> dict:
    from netns import NodeNetwork

    world_size = nodes * local
    with NodeNetwork("mn", nodes, args.rate) as network, tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        procs = []
        for rank in range(world_size):
            node, local_rank = divmod(rank, local)
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                       LOCAL_WORLD_SIZE=str(local), GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1")
            command = network.exec_prefix(node) + [sys.executable, __file__, "--worker", "--master", network.address(0),
                                                   "--port", str(PORT), "--report", report_path, *_shared_flags(args)]
            procs.append(subprocess.Popen(command, env=env))
        try:
            codes = [p.wait(timeout=args.timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes):
            raise SystemExit(f"layout {nodes}x{local}: a rank failed ({codes})")
        with open(report_path) as f:
            return json.load(f)


def _shared_flags(args) -> list:
    return ["--numel", str(args.numel), "--ratio", str(args.ratio), "--reps", str(args.reps), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--gbps", str(args.gbps), "--latency-us", str(args.latency_us)]


def modelled(nodes: int, local: int, args) -> dict:
    from raytopk.exchange import Layout, Link, cost

    link = Link(inter_gbps=args.gbps, inter_latency_us=args.latency_us)
    k = math.ceil(args.ratio * args.numel)
    layout = Layout(nodes * local, local)
    return {name: cost(name, layout, args.numel, k, link=link).__dict__ for name in EXCHANGES}


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(HOOK_METHODS)
    for i, method in enumerate(HOOK_METHODS):
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [1000 * r["steps"][method]["median_step_s"] for r in rows], width, label=method)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["layout"] for r in rows])
    left.set_yscale("log")
    left.set_ylabel("median training step, ms (log)")
    left.set_title("DDP step, Linear(1024, 1024), ratio 0.01")
    left.legend()
    markers = {"dense": "s", "allgather": "o", "sharded": "^", "hierarchical": "D"}
    for r in rows:
        for name in EXCHANGES:
            left_value = 1000 * r["model"][name]["seconds"]
            right.scatter(left_value, 1000 * r["exchanges"][name]["median_s"], marker=markers[name],
                          label=f"{name}" if r is rows[0] else None, color=f"C{EXCHANGES.index(name)}")
    lims = [0.5, 2000]
    right.plot(lims, lims, "k--", linewidth=0.8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("modelled exchange time, ms")
    right.set_ylabel("measured exchange time, ms")
    right.set_title("Cost model against the emulation (every layout)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="100mbit", help="each node's card, for tc tbf (default 100mbit)")
    parser.add_argument("--gbps", type=float, default=0.1, help="the same rate in Gbit/s, for the cost model")
    parser.add_argument("--latency-us", type=float, default=200.0,
                        help="latency per message between nodes for the cost model (gloo over veth on this machine)")
    parser.add_argument("--numel", type=int, default=1 << 20, help="entries of the synthetic bucket")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multinode.json"))
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.worker:
        worker(args)
        return

    import torch

    from raytopk.storage import write_json

    rows = []
    for nodes, local in LAYOUTS:
        started = time.time()
        report = run_layout(nodes, local, args)
        report.update(layout=f"{nodes}x{local}", nodes=nodes, ranks_per_node=local, model=modelled(nodes, local, args))
        rows.append(report)
        print(f"\n{nodes} nodes x {local} ranks ({time.time() - started:.0f} s)")
        print("| exchange | measured ms | modelled ms | counted MB | wire MB (between nodes + inside) | modelled MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in EXCHANGES:
            e, m = report["exchanges"][name], report["model"][name]
            wire = e["wire_bytes_between_nodes_per_exchange"] + e["wire_bytes_inside_nodes_per_exchange"]
            print(f"| {name} | {1000 * e['median_s']:.1f} | {1000 * m['seconds']:.1f} | {e['counted_bytes_per_exchange'] / 1e6:.3f} | "
                  f"{wire / 1e6:.3f} | {nodes * local * m['bytes_sent'] / 1e6:.3f} |")
        dense = report["steps"]["dense"]["median_step_s"]
        print("| training step | median ms | vs dense | exchange used |")
        print("|---|---:|---:|---|")
        for method in HOOK_METHODS:
            s = report["steps"][method]
            print(f"| {method} | {1000 * s['median_step_s']:.1f} | {dense / s['median_step_s']:.1f}x | {'+'.join(s['exchange_chosen'])} |")
    write_json(args.output, {
        "command": " ".join([COMMAND] + sys.argv[1:]),
        "torch": torch.__version__,
        "host": f"one machine, {os.cpu_count()} CPUs",
        "network": f"each node a network namespace; card: veth into a bridge, MTU 9000, tc tbf {args.rate}; inside a node: loopback",
        "bottleneck": "the shaped card; see each layout's step times (dense vs top-k) for the CPU's share",
        "numel": args.numel, "ratio": args.ratio, "reps": args.reps, "steps": args.steps,
        "cost_model_link": {"inter_gbps": args.gbps, "inter_latency_us": args.latency_us},
        "layouts": rows,
    })
    plot(rows, os.path.splitext(args.output)[0] + ".png")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
