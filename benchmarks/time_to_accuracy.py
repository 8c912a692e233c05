"""Time to accuracy on a slow link: whole ``raytopk train`` runs, Ray included, on a shaped network.

What is measured: the benchmark enters a private network namespace (root needed) and, for each
link and method, runs ``python -m raytopk train`` there as a user would: a local Ray starts,
2 Ray Train workers of one CPU thread each train, evaluate and checkpoint every epoch, and Ray
shuts down. All of it talks over the namespace's loopback, which ``tc tbf`` holds to the link's
rate (``--links``; ``unlimited`` leaves it alone). Both workers share that one link, so the rate
caps their summed traffic. Methods (``--methods``), each a job key users have too:

- ``dense``: DDP's allreduce (``method: dense``);
- ``fp16``: PyTorch's ``fp16_compress_hook`` (``method: fp16``);
- ``topk 0.01`` and ``topk 0.001``: raytopk's hook (``method: topk``); ``topk 0.001 + DGC`` adds
  Deep Gradient Compression's options (warm-up from 25% over the first epoch, momentum
  correction, clipping at norm 5, per-layer selection).

Per run and epoch: test accuracy, training samples per second (the epoch's training steps
only) and the training time so far. Time to accuracy is the training time until the test
accuracy first reaches ``--target``; evaluation and checkpoints, the same for every method, are
left out of it and kept in ``wall_s``. Runs share 2 cores, so an epoch's samples per second moves
by about 10% from run to run: ``--repeats N`` runs every link and method N times, in rounds, and
each row gives the median. Each finished run is kept in ``OUTPUT.partial``, so an
interrupted benchmark continues where it stopped; the results are written whole at the end.

Reproduce (from the repository root, as root)::

    python benchmarks/time_to_accuracy.py            # SimpleCNN on mnist5k: every link and method
    python benchmarks/time_to_accuracy.py --model resnet20 --epochs 4 --target 0.9 \\
        --methods dense fp16 topk\\ 0.01 --output benchmarks/results/time_to_accuracy_resnet20.json
    python benchmarks/time_to_accuracy.py --links unlimited 100mbit --methods dense topk\\ 0.01 \\
        --repeats 3 --output benchmarks/results/throughput_simple_cnn.json

Results: ``benchmarks/results/time_to_accuracy.json`` and ``.png`` (accuracy against training
time, one panel per link).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from raytopk.storage import read_text, write_figure, write_json  # noqa: E402

from netns import reexec_in_namespace, shape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python benchmarks/time_to_accuracy.py"
LINKS = {"unlimited": None, "1gbit": "1gbit", "100mbit": "100mbit"}
DGC = ["warmup_ratio=0.25", "warmup_epochs=1", "momentum_correction=true", "clip_norm=5.0", "per_layer=true"]
METHODS = {
    "dense": ["method=dense"],
    "fp16": ["method=fp16"],
    "topk 0.01": ["method=topk", "ratio=0.01"],
    "topk 0.001": ["method=topk", "ratio=0.001"],
    "topk 0.001 + DGC": ["method=topk", "ratio=0.001", *DGC],
}


def train(args, link: str, method: str, storage: str) -> dict:
    """One ``raytopk train`` on the link as it is shaped now; its per-epoch record."""
    name = f"{link}-{method}".replace(" ", "_").replace("+", "dgc")
    output = os.path.join(storage, f"{name}.json")
    sets = [
        f"model={args.model}",
        f"dataset={args.dataset}",
        f"epochs={args.epochs}",
        f"batch_size={args.batch_size}",
        f"max_train_batches={args.max_train_batches}",
        "workers=2",
        "cpus_per_worker=1",
        f"checkpoint_dir={storage}",
        f"name={name}",
        f"output={output}",
        "keep_checkpoints=1",
        *METHODS[method],
    ]
    command = [sys.executable, "-m", "raytopk", "train", "--restart"] + [
        arg for pair in sets for arg in ("--set", pair)
    ]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{link} {method}: raytopk train exited {done.returncode}:\n{done.stderr[-3000:]}")
    with open(output) as f:
        summary = json.load(f)
    trained, epochs = 0.0, []
    for m in summary["history"]:
        trained += m["train_s"]
        epochs.append(
            {
                "epoch": m["epoch"],
                "test_accuracy": m["test_accuracy"],
                "samples_per_s": m["samples_per_s"],
                "train_s": trained,
                "bytes_sent": m["bytes_sent"],
            }
        )
    reached = next((e["train_s"] for e in epochs if e["test_accuracy"] >= args.target), None)
    steady = epochs[1:] or epochs  # the first epoch includes DDP's and the hook's warm-up steps
    return {
        "link": link,
        "method": method,
        "epochs": epochs,
        "time_to_target_s": reached,
        "wall_s": time.time() - started,
        "samples_per_s": sum(e["samples_per_s"] for e in steady) / len(steady),
        "final_accuracy": epochs[-1]["test_accuracy"],
    }


def summarize(runs: list, target: float) -> list:
    """One row per link and method (medians over its repeats), against dense on the same link and dense with no
    limit."""
    groups = {}
    for r in runs:
        groups.setdefault((r["link"], r["method"]), []).append(r)
    speed = {key: statistics.median(r["samples_per_s"] for r in group) for key, group in groups.items()}
    rows = []
    for (link, method), group in groups.items():
        dense, free = speed.get((link, "dense")), speed.get(("unlimited", "dense"))
        reached = [r["time_to_target_s"] for r in group if r["time_to_target_s"] is not None]
        rows.append(
            {
                "link": link,
                "method": method,
                "repeats": len(group),
                "samples_per_s": speed[(link, method)],
                "of_dense_unlimited": speed[(link, method)] / free if free else None,
                "vs_dense_same_link": speed[(link, method)] / dense if dense else None,
                # Reached in every repeat, or it counts as not reached.
                "time_to_target_s": statistics.median(reached) if len(reached) == len(group) else None,
                "target": target,
                "final_accuracy": statistics.median(r["final_accuracy"] for r in group),
                "wire_mb_per_worker": group[0]["epochs"][-1]["bytes_sent"] / 2 / 1e6,
            }
        )
    return rows


def format_table(rows: list) -> str:
    lines = [
        "| link | method | samples/s | of dense, no limit | vs dense, same link | s to target | final accuracy % | "
        "wire MB/worker |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reached = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        lines.append(
            f"| {r['link']} | {r['method']} | {r['samples_per_s']:.0f} | {_ratio(r['of_dense_unlimited'])} | "
            f"{_ratio(r['vs_dense_same_link'])} | {reached} | {100 * r['final_accuracy']:.2f} | "
            f"{r['wire_mb_per_worker']:.2f} |"
        )
    return "\n".join(lines)


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def plot(runs: list, links: list, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4), squeeze=False, sharey=True)
    for axis, link in zip(axes[0], links):
        for i, method in enumerate(METHODS):
            run = next((r for r in runs if (r["link"], r["method"]) == (link, method)), None)
            if run:
                axis.plot(
                    [e["train_s"] for e in run["epochs"]],
                    [100 * e["test_accuracy"] for e in run["epochs"]],
                    marker="o",
                    color=f"C{i}",
                    label=method,
                )
        axis.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"link: {link}")
        axis.set_xlabel("training time (s)")
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-batches", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach (a fraction)")
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each link and method; rows give medians")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "time_to_accuracy.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be an integer >= 1, got {args.repeats}")
    reexec_in_namespace("tta")

    partial = args.output + ".partial"
    runs = json.loads(read_text(partial))["runs"] if os.path.exists(partial) else []
    with tempfile.TemporaryDirectory(prefix="tta") as storage:
        for repeat in range(args.repeats):  # in rounds, so drift in the machine's speed touches every method alike
            for link in args.links:
                for method in args.methods:
                    if any((r["link"], r["method"], r.get("repeat", 0)) == (link, method, repeat) for r in runs):
                        continue
                    shape(LINKS[link])
                    try:
                        runs.append({**train(args, link, method, storage), "repeat": repeat})
                    finally:
                        shape(None)
                    write_json(partial, {"runs": runs})
                    print(
                        f"{link:>9}  {method:<17} {runs[-1]['samples_per_s']:7.0f} samples/s  "
                        f"accuracy {100 * runs[-1]['final_accuracy']:.2f}%  (round {repeat + 1})",
                        flush=True,
                    )
    rows = summarize(runs, args.target)
    print(format_table(rows))
    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "model": args.model,
            "dataset": args.dataset,
            "epochs": args.epochs,
            "batch_size_per_worker": args.batch_size,
            "max_train_batches": args.max_train_batches,
            "workers": 2,
            "threads_per_worker": 1,
            "repeats": args.repeats,
            "network": "one loopback shared by both workers and Ray, in a private namespace, shaped with tc tbf",
            "rows": rows,
            "runs": runs,
        },
    )
    plot(runs, args.links, args.target, os.path.splitext(args.output)[0] + ".png")
    os.remove(partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
