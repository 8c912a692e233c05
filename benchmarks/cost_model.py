"""Project each exchange's bytes and time per step from 2 to 1,024 workers with raytopk's cost model.

No process starts: :func:`raytopk.cost_model.cost` gives the bytes each worker
sends and the alpha-beta time of one bucket; a step is the sum over DDP's
buckets. The model: ResNet-50's gradient (25,557,032 fp32 entries) in DDP's
default 25 MB buckets, top-k at ``--ratio`` (0.01) with fp32 values, nodes of 8
workers (fewer than 8 workers share one node), :class:`raytopk.exchange.Link`'s
defaults inside a node (100 Gbit/s, 5 us) and 50 us per message between nodes,
at 10 and 100 Gbit/s between nodes. ``benchmarks/multinode.py`` checks the
model against emulated nodes on this machine.

Reproduce::

    python benchmarks/cost_model.py

Results go to ``benchmarks/results/cost_model.json`` and ``cost_model.png``.
"""

import argparse
import os
import sys

from raytopk.cost_model import ALGORITHMS, Layout, Link, accurate_exchanges, budget, cost
from raytopk.storage import write_figure, write_json

COMMAND = "python benchmarks/cost_model.py"
RESNET50 = 25_557_032
BUCKET_ENTRIES = 25 * 1024 * 1024 // 4  # DDP's bucket_cap_mb=25
WORKERS = [2**i for i in range(1, 11)]
RATES_GBPS = [10, 100]
RANKS_PER_NODE = 8


def buckets(numel: int) -> list:
    full, rest = divmod(numel, BUCKET_ENTRIES)
    return [BUCKET_ENTRIES] * full + ([rest] if rest else [])


def step(algorithm: str, workers: int, gbps: float, ratio: float) -> dict:
    layout = Layout(workers, min(workers, RANKS_PER_NODE))
    link = Link(inter_gbps=gbps)
    costs = [cost(algorithm, layout, n, budget(ratio, n, workers), link=link) for n in buckets(RESNET50)]
    return {"bytes_per_worker": sum(c.bytes_sent for c in costs), "seconds": sum(c.seconds for c in costs)}


def crossovers(table: dict, gbps: float) -> list:
    """Where one algorithm overtakes another as workers grow: (faster from, slower, first worker count)."""
    found = []
    pairs = [
        ("dense", "allgather"),
        ("sharded", "allgather"),
        ("hierarchical", "sharded"),
        ("hierarchical", "allgather"),
        ("dense", "sharded"),
    ]
    for a, b in pairs:
        times = [(w, table[a][w]["seconds"], table[b][w]["seconds"]) for w in WORKERS]
        first = next((w for w, ta, tb in times if ta < tb), None)
        found.append({"gbps": gbps, "faster": a, "than": b, "from_workers": first})
    return found


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RATES_GBPS), figsize=(13, 5), sharey=True)
    for ax, gbps in zip(axes, RATES_GBPS):
        table = results[str(gbps)]
        for name in ALGORITHMS:
            ax.plot(WORKERS, [1000 * table[name][w]["seconds"] for w in WORKERS], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers (8 per node)")
        ax.set_title(f"ResNet-50, {gbps} Gbit/s between nodes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("modelled exchange time per step, ms (log)")
    axes[0].legend()
    fig.tight_layout()
    write_figure(path, fig, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cost_model.json")
    )
    args = parser.parse_args()
    results, found = {}, []
    for gbps in RATES_GBPS:
        table = {name: {w: step(name, w, gbps, args.ratio) for w in WORKERS} for name in ALGORITHMS}
        results[str(gbps)] = table
        found += crossovers(table, gbps)
        print(
            f"\nResNet-50, ratio {args.ratio}, {gbps} Gbit/s between nodes: modelled ms per step (MB sent per worker)\n"
        )
        # auto: the fastest of the exchanges measured not to cost accuracy for the layout
        # (raytopk.cost_model.accurate_exchanges)
        print("| workers | " + " | ".join(ALGORITHMS) + " | fastest | auto |")
        print("|---:|" + "---:|" * len(ALGORITHMS) + "---|---|")
        for w in WORKERS:
            cells = [
                f"{1000 * table[n][w]['seconds']:.1f} ({table[n][w]['bytes_per_worker'] / 1e6:.1f})" for n in ALGORITHMS
            ]
            fastest = min(("allgather", "sharded", "hierarchical"), key=lambda n: table[n][w]["seconds"])
            auto = min(accurate_exchanges(Layout(w, min(w, RANKS_PER_NODE))), key=lambda n: table[n][w]["seconds"])
            print(f"| {w} | " + " | ".join(cells) + f" | {fastest} | {auto} |")
    print("\nCrossovers (the first worker count, of powers of two, where the first is faster than the second):")
    for c in found:
        print(
            f"  {c['gbps']} Gbit/s: {c['faster']} < {c['than']} "
            f"from {c['from_workers'] or 'never (up to 1024)'} workers"
        )
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "model": "ResNet-50 gradient, 25,557,032 fp32 entries, DDP buckets of 25 MB",
            "ratio": args.ratio,
            "ranks_per_node": RANKS_PER_NODE,
            "link": {
                "inter_latency_us": Link().inter_latency_us,
                "intra_gbps": Link().intra_gbps,
                "intra_latency_us": Link().intra_latency_us,
                "inter_gbps": RATES_GBPS,
            },
            "results": {
                g: {n: {str(w): v for w, v in t.items()} for n, t in table.items()} for g, table in results.items()
            },
            "crossovers": found,
        },
    )
    plot(results, os.path.splitext(args.output)[0] + ".png")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
