"""Several nodes on one machine: each a network namespace whose card is a shaped veth into a bridge.

What is measured, for each layout (nodes x ranks per node: 2x2, 4x1, 4x2):

1. **Exchanges alone.** Every rank holds a synthetic bucket of ``--numel``
   fp32 entries (normal noise) and exchanges its top ``--ratio`` with
   ``raytopk.exchange``'s all-gather, sharded and hierarchical algorithms, and
   as dense DDP would (one ``all_reduce``). Median time over repetitions (the
   slowest rank's), bytes each rank counted, and the bytes the namespaces'
   counters saw (every node's ``eth0`` and ``lo``), against
   :func:`raytopk.cost_model.cost` with this network's figures.
2. **Training steps.** DDP on ``Linear(2048, 2048)`` (4.2M parameters,
   16.8 MB of gradient), batch 2 per rank, SGD: dense DDP, then the raytopk
   hook at ``--ratio`` with ``exchange="allgather"``, ``"sharded"``,
   ``"hierarchical"`` and the default ``"auto"``. Median step time.

Ranks learn their node layout as under torchrun or Ray Train, from
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. Gloo talks TCP: between nodes over the
shaped cards (``--rate``, 100 Mbit/s by default), inside a node over its
loopback. Up to 8 ranks share this machine's CPU cores, so the link must stay
the bottleneck: at 100 Mbit/s dense DDP's 16.8 MB ring allreduce takes
seconds a step and top-k's exchange about a hundred milliseconds, against a
few milliseconds of compute per rank. Oversubscribed cores still make each
message slow to answer, so the latency per message is measured (a 4-byte
all-gather, per ring step) and the cost model uses it; the results record it.

Reproduce (from the repository root, as root)::

    python benchmarks/multinode.py

Results go to ``benchmarks/results/multinode.json`` and ``multinode.png``.
"""

import argparse
import json
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
    from raytopk.cost_model import budget
    from raytopk.exchange import Exchanger, Link, dense_network_bytes, node_layout

    from netns import read_node_tx_bytes, shape_node_card

    torch.set_num_threads(1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank, world_size=world_size)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    # Latency per message on this machine, for the cost model: a 4-byte all-gather is W - 1 ring steps.
    tiny, ring_steps = torch.zeros(1), []
    for _ in range(25):
        dist.barrier()
        started = time.perf_counter()
        dist.all_gather([torch.empty(1) for _ in range(world_size)], tiny)
        ring_steps.append(slowest(time.perf_counter() - started) / max(world_size - 1, 1))
    latency_us = 1e6 * statistics.median(ring_steps)
    # Bandwidth inside a node (loopback TCP on shared cores, not 100 Gbit/s): an all-to-all of 8 MB on each node.
    intra_gbps = Link().intra_gbps
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    if local > 1:
        on_node = Exchanger("hierarchical", dist.group.WORLD, Link(), 1.25).intra
        chunk = torch.zeros(2 << 20)
        passes = []
        for _ in range(5):
            dist.barrier()
            started = time.perf_counter()
            dist.all_to_all_single(torch.empty_like(chunk), chunk, group=on_node)
            passes.append(slowest(time.perf_counter() - started))
        intra_gbps = (local - 1) / local * chunk.numel() * 4 * 8 / statistics.median(passes) / 1e9
    link = Link(inter_gbps=args.gbps, inter_latency_us=latency_us, intra_gbps=intra_gbps, intra_latency_us=latency_us)

    def shape_card(rate) -> None:
        """Local rank 0 shapes its node's card (or lifts the limit: ``None``); everyone waits for every node."""
        if local_rank == 0:
            shape_node_card(rate, args.burst)
        dist.barrier()

    def counters():
        dist.barrier()
        mine = read_node_tx_bytes() if local_rank == 0 else {"between_nodes": 0, "inside_node": 0}
        t = torch.tensor([mine["between_nodes"], mine["inside_node"]], dtype=torch.float64)
        dist.all_reduce(t)
        return t

    report = {"exchanges": {}, "steps": {}, "latency_us_per_message": latency_us, "intra_gbps": intra_gbps}
    layout = node_layout(dist.group.WORLD)[0]
    # 1. exchanges alone
    k = budget(args.ratio, args.numel, dist.get_world_size())
    bucket = torch.randn(args.numel, generator=torch.Generator().manual_seed(rank))
    for algorithm, rate in [(a, r) for a in EXCHANGES for r in (None, args.rate)]:
        shape_card(rate)  # unshaped first: what the exchange costs without the link (compute, latency)
        exchanger = None if algorithm == "dense" else Exchanger(algorithm, dist.group.WORLD, link, 1.25)
        times, sent, network = [], 0, 0.0
        before = None
        for rep in range(args.warmup + args.reps):
            if rep == args.warmup:
                before, sent, network = counters(), 0, 0.0
            acc, out = bucket.clone(), torch.zeros_like(bucket)
            dist.barrier()
            started = time.perf_counter()
            if exchanger is None:
                dist.all_reduce(acc)
                rep_sent = 2 * (world_size - 1) / world_size * acc.numel() * 4
            else:
                future, rep_sent, *_ = exchanger.run(algorithm, acc, k, torch.float32, out)
                future.wait()
            elapsed = slowest(time.perf_counter() - started)
            if rep >= args.warmup:
                times.append(elapsed)
                sent += rep_sent
                network += (
                    exchanger.network_bytes(algorithm, args.numel, k, 4, rep_sent)
                    if exchanger
                    else dense_network_bytes(args.numel * 4, layout)
                )
        wire = counters() - before
        counted = torch.tensor([float(sent), network])
        dist.all_reduce(counted)
        if rate is None:
            unshaped = statistics.median(times)
            continue
        report["exchanges"][algorithm] = {
            "median_unshaped_s": unshaped,
            "median_s": statistics.median(times),
            "counted_bytes_per_exchange": float(counted[0]) / args.reps,
            # raytopk's model of the bytes that cross node cards (stats["network_bytes"]), summed over ranks
            "counted_network_bytes_per_exchange": float(counted[1]) / args.reps,
            "wire_bytes_between_nodes_per_exchange": float(wire[0]) / args.reps,
            "wire_bytes_inside_nodes_per_exchange": float(wire[1]) / args.reps,
        }

    # 2. training steps
    for method in HOOK_METHODS:
        torch.manual_seed(0)
        model = torch.nn.Linear(2048, 2048)
        ddp = DDP(model, gradient_as_bucket_view=True)  # as raytopk's training loop runs it
        state = None
        if method != "dense":
            state = raytopk.TopKState(
                ratio=args.ratio, start_iter=2, exchange=method, link_gbps=args.gbps, link_latency_us=latency_us
            )
            ddp.register_comm_hook(state, raytopk.topk_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(2, 2048, generator=g), torch.randn(2, 2048, generator=g)
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
    with NodeNetwork("mn", nodes, args.rate, args.burst) as network, tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        procs = []
        for rank in range(world_size):
            node, local_rank = divmod(rank, local)
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(local_rank),
                LOCAL_WORLD_SIZE=str(local),
                GLOO_SOCKET_IFNAME="eth0",
                OMP_NUM_THREADS="1",
            )
            command = network.exec_prefix(node) + [
                sys.executable,
                __file__,
                "--worker",
                "--master",
                network.address(0),
                "--port",
                str(PORT),
                "--report",
                report_path,
                *_shared_flags(args),
            ]
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
    return [
        "--numel",
        str(args.numel),
        "--ratio",
        str(args.ratio),
        "--reps",
        str(args.reps),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--gbps",
        str(args.gbps),
        "--rate",
        args.rate,
        "--burst",
        args.burst,
    ]


def modelled(nodes: int, local: int, args, report: dict) -> dict:
    """The cost model with this network's figures, and the part of its time the card's bandwidth adds."""
    from raytopk.cost_model import Layout, Link, budget, cost

    latency, intra = report["latency_us_per_message"], report["intra_gbps"]
    shaped = Link(inter_gbps=args.gbps, inter_latency_us=latency, intra_gbps=intra, intra_latency_us=latency)
    unlimited = Link(inter_gbps=1e9, inter_latency_us=latency, intra_gbps=intra, intra_latency_us=latency)
    k = budget(args.ratio, args.numel, nodes * local)
    layout = Layout(nodes * local, local)
    rows = {}
    for name in EXCHANGES:
        c = cost(name, layout, args.numel, k, link=shaped)
        rows[name] = {
            "bytes_sent": c.bytes_sent,
            "network_bytes": c.network_bytes,
            "seconds": c.seconds,
            "link_seconds": c.seconds - cost(name, layout, args.numel, k, link=unlimited).seconds,
        }
    return rows


def plot(rows: list, path: str, rate: str, ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raytopk.storage import write_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(HOOK_METHODS)
    for i, method in enumerate(HOOK_METHODS):
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [1000 * r["steps"][method]["median_step_s"] for r in rows], width, label=method)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["layout"] for r in rows])
    left.set_yscale("log")
    left.set_ylabel("median training step, ms (log)")
    left.set_title(f"DDP step, Linear(2048, 2048), ratio {ratio}, cards at {rate}")
    left.legend()
    markers = {"dense": "s", "allgather": "o", "sharded": "^", "hierarchical": "D"}
    for r in rows:
        for name in EXCHANGES:
            right.scatter(
                1000 * r["model"][name]["link_seconds"],
                1000 * r["exchanges"][name]["link_adds_s"],
                marker=markers[name],
                label=f"{name}" if r is rows[0] else None,
                color=f"C{EXCHANGES.index(name)}",
            )
    lims = [5, 5000]
    right.plot(lims, lims, "k--", linewidth=0.8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("modelled: time the shaped card adds, ms")
    right.set_ylabel("measured: shaped minus unshaped exchange, ms")
    right.set_title("Cost model against the emulation (every layout)")
    right.legend()
    fig.tight_layout()
    write_figure(path, fig, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="100mbit", help="each node's card, for tc tbf (default 100mbit)")
    parser.add_argument("--burst", default="32kb", help="tc tbf burst of each card")
    parser.add_argument("--gbps", type=float, default=0.1, help="the same rate in Gbit/s, for the cost model")
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=[f"{nodes}x{per_node}" for nodes, per_node in LAYOUTS],
        help="nodes x ranks per node, e.g. 4x2 (default: 2x2 4x1 4x2)",
    )
    parser.add_argument("--numel", type=int, default=1 << 22, help="entries of the synthetic bucket")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multinode.json")
    )
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.worker:
        worker(args)
        return

    import torch

    from raytopk.storage import write_json

    rows = []
    for nodes, local in [tuple(int(part) for part in layout.split("x")) for layout in args.layouts]:
        started = time.time()
        report = run_layout(nodes, local, args)
        report.update(
            layout=f"{nodes}x{local}", nodes=nodes, ranks_per_node=local, model=modelled(nodes, local, args, report)
        )
        rows.append(report)
        print(
            f"\n{nodes} nodes x {local} ranks ({time.time() - started:.0f} s; latency per message "
            f"{report['latency_us_per_message']:.0f} us, inside a node {report['intra_gbps']:.1f} Gbit/s)"
        )
        print(
            "| exchange | measured ms | unshaped ms | link adds ms | model: link adds ms | ratio | counted MB "
            "| wire MB | wire / modelled | counted across nodes MB | wire across nodes MB | wire / counted across |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in EXCHANGES:
            e, m = report["exchanges"][name], report["model"][name]
            wire = e["wire_bytes_between_nodes_per_exchange"] + e["wire_bytes_inside_nodes_per_exchange"]
            model_bytes = nodes * local * m["bytes_sent"]
            link_adds = e["median_s"] - e["median_unshaped_s"]
            e["link_adds_s"], e["link_adds_over_model"] = link_adds, link_adds / m["link_seconds"]
            e["wire_over_model_bytes"] = wire / model_bytes
            across, counted_across = e["wire_bytes_between_nodes_per_exchange"], e["counted_network_bytes_per_exchange"]
            e["wire_over_counted_network"] = across / counted_across if counted_across else None
            print(
                f"| {name} | {1000 * e['median_s']:.1f} | {1000 * e['median_unshaped_s']:.1f} | "
                f"{1000 * link_adds:.1f} | {1000 * m['link_seconds']:.1f} | {e['link_adds_over_model']:.2f} | "
                f"{e['counted_bytes_per_exchange'] / 1e6:.3f} | {wire / 1e6:.3f} | {e['wire_over_model_bytes']:.3f} | "
                f"{counted_across / 1e6:.3f} | {across / 1e6:.3f} | {e['wire_over_counted_network'] or 0:.3f} |"
            )
        dense = report["steps"]["dense"]["median_step_s"]
        print("| training step | median ms | vs dense | exchange used |")
        print("|---|---:|---:|---|")
        for method in HOOK_METHODS:
            s = report["steps"][method]
            print(
                f"| {method} | {1000 * s['median_step_s']:.1f} | {dense / s['median_step_s']:.1f}x | "
                f"{'+'.join(s['exchange_chosen'])} |"
            )
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "host": f"one machine, {os.cpu_count()} CPUs",
            "network": (
                f"each node a network namespace; card: veth into a bridge, MTU 9000, tc tbf {args.rate}; "
                "inside a node: loopback"
            ),
            "bottleneck": "the shaped card; see each layout's step times (dense vs top-k) for the CPU's share",
            "numel": args.numel,
            "ratio": args.ratio,
            "reps": args.reps,
            "steps": args.steps,
            "cost_model_link": {
                "inter_gbps": args.gbps,
                "inter_latency_us": "measured per layout (latency_us_per_message)",
            },
            "layouts": rows,
        },
    )
    plot(rows, os.path.splitext(args.output)[0] + ".png", args.rate, args.ratio)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
