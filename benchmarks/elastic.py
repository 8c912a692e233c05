"""An elastic run through a node loss on the local autoscaling cluster, beside the same job left alone.

What is measured: ``jobs/local_cluster.yaml`` (SimpleCNN on mnist5k, top-k 0.01, 1 to 3 workers,
each on its own node) trains on Ray's fake multinode provider (``clusters/local.yaml`` with only
its one-"GPU" node type, at most 3 nodes). Once it trains with 3 workers, one worker's node is
lost (its raylet and every process under it SIGKILLed at once). The autoscaler cannot replace it
(the dead node keeps its place on this provider while the run asks for 3), so the run goes on with
2 workers from its last checkpoint; then a node joins by hand, as a user adds a machine, and the
run grows back to 3. Before it, the same job at a fixed 3 workers on the same cluster, uninterrupted. Per epoch:
workers, learning rate, bytes on the wire, test accuracy; at each resize, how far the mean residual of the new group is
from the saved one. The link is loopback on one machine (the CPU is the bottleneck here, not the network).

Reproduce (from the repository root; the head takes port 6379)::

    python benchmarks/elastic.py

Results go to ``benchmarks/results/elastic.json`` and ``elastic.png``.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from raytopk.storage import write_figure, write_json  # noqa: E402

from cluster import FAKE_GCS, fake_cluster, joined_node, lose_node, one_gpu_nodes, ray_list  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python benchmarks/elastic.py"
EPOCHS = 60
FLAGS = ["--epochs", str(EPOCHS), "--max-train-batches", "8", "--resize-interval-s", "10"]


def _train(head, storage, name, *flags):
    env = dict(head[1], RAY_ADDRESS=FAKE_GCS)
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--config",
        os.path.join(ROOT, "jobs", "local_cluster.yaml"),
        "--checkpoint-dir",
        storage,
        "--name",
        name,
        "--output",
        os.path.join(storage, f"{name}.json"),
        *FLAGS,
        *flags,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _read_until(process, *words) -> None:
    """Consume ``process``'s output until a line holds every one of ``words``."""
    for line in process.stdout:
        if all(word in line for word in words):
            return
    raise SystemExit(f"the run ended before printing {words}")


def _summary(process, storage, name) -> dict:
    process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed with exit {process.returncode}")
    with open(os.path.join(storage, f"{name}.json")) as f:
        return json.load(f)


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as storage,
        fake_cluster(one_gpu_nodes(os.path.join(ROOT, "clusters", "local.yaml"), storage, 3)) as head,
    ):
        fixed_summary = _summary(_train(head, storage, "fixed", "--min-workers", "0"), storage, "fixed")
        started = time.time()
        elastic = _train(head, storage, "elastic")
        _read_until(elastic, f"epoch 3/{EPOCHS}", "3 workers")
        workers = ray_list(*head, "actors", "class_name=RayTrainWorker", "state=ALIVE")
        lose_node(workers[-1]["node_id"])
        lost_after_s = time.time() - started
        _read_until(elastic, "2 workers")
        with joined_node(head[1], "--num-cpus=1", "--resources='{\"fake_gpu\": 1}'"):
            joined_after_s = time.time() - started
            _read_until(elastic, "3 workers")
            elastic_summary = _summary(elastic, storage, "elastic")

    def rows(summary):
        return [
            {
                key: m.get(key)
                for key in (
                    "epoch",
                    "workers",
                    "lr",
                    "bytes_sent",
                    "test_accuracy",
                    "resized_from",
                    "residual_mean_error",
                )
            }
            for m in summary["history"]
        ]

    result = {
        "command": COMMAND,
        "job": "jobs/local_cluster.yaml",
        "flags": FLAGS,
        "cluster": "clusters/local.yaml, gpu_1x nodes only, at most 3 (Ray's fake multinode provider, one machine)",
        "bottleneck": "CPU (2 cores, loopback link)",
        "node_lost_after_s": round(lost_after_s, 1),
        "node_joined_after_s": round(joined_after_s, 1),
        "elastic": {
            "test_accuracy": elastic_summary["test_accuracy"],
            "bytes_sent": elastic_summary["bytes_sent"],
            "wall_s": elastic_summary["wall_s"],
            "epochs": rows(elastic_summary),
        },
        "uninterrupted": {
            "test_accuracy": fixed_summary["test_accuracy"],
            "bytes_sent": fixed_summary["bytes_sent"],
            "wall_s": fixed_summary["wall_s"],
            "epochs": rows(fixed_summary),
        },
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    write_json(os.path.join(ROOT, "benchmarks", "results", "elastic.json"), result)
    _plot(result, os.path.join(ROOT, "benchmarks", "results", "elastic.png"))
    for name in ("elastic", "uninterrupted"):
        run = result[name]
        counts = [m["workers"] for m in run["epochs"]]
        print(
            f"{name:<14} test acc {100 * run['test_accuracy']:.2f}%  wire {run['bytes_sent'] / 1e6:.1f} MB  "
            f"epochs at 3/2/1 workers: {counts.count(3)}/{counts.count(2)}/{counts.count(1)}  "
            f"wall {run['wall_s']:.0f} s"
        )


def _plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for name, style in (("uninterrupted", "--"), ("elastic", "-")):
        epochs = result[name]["epochs"]
        x = [m["epoch"] for m in epochs]
        top.plot(x, [m["workers"] for m in epochs], style, label=name, drawstyle="steps-post")
        middle.plot(x, [m["bytes_sent"] / 1e6 for m in epochs], style, label=name)
        bottom.plot(x, [100 * m["test_accuracy"] for m in epochs], style, label=name)
    top.set_ylabel("workers")
    middle.set_ylabel("wire MB (all workers)")
    bottom.set_ylabel("test accuracy %")
    bottom.set_xlabel("epoch")
    top.legend()
    top.set_title("Elastic run through a lost node vs. uninterrupted (mnist5k, top-k 0.01)")
    fig.tight_layout()
    write_figure(path, fig)


if __name__ == "__main__":
    main()
