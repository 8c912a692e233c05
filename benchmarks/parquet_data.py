"""Own data through Ray Data against the built-in torchvision path: training speed, the driver's memory, accuracy.

What is measured, each as ``python -m raytopk train`` runs as a user runs it (a local Ray
started and stopped per run):

- **speed**: Fashion-MNIST, SimpleCNN, 2 workers of one CPU each, top-k 0.01, one epoch, read
  by torchvision (``dataset: fashion_mnist``) and as Parquet exported with ``raytopk export``
  (PNG bytes, decoded and normalised by Ray Data tasks). Samples per second count the epoch's
  training steps, the runs alternate, and each row is the median of ``--repeats`` runs; the
  ratio is Parquet over torchvision. On this 2-core machine Ray Data's decode tasks share the
  cores with the two workers, so the ratio is a lower bound for a node with CPUs to spare.
- **driver memory**: the peak resident memory of the ``raytopk train`` process (the driver:
  pre-flight, Ray Data's planning, Ray Train's controller calls) on the Parquet export and on
  the same files copied ``--scale`` times (so ``--scale`` times the rows), 50 training steps and
  the whole test split each. The driver reads footers and one row group, never the rows.
- **accuracy**: mnist5k, 3 epochs, 2 workers, dense, built in and as exported Parquet in both
  layouts: the issue's "same accuracy within 1 point".

Reproduce (from the repository root; Fashion-MNIST from Debian's ``dataset-fashion-mnist``)::

    python benchmarks/parquet_data.py --repeats 5
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from raytopk.storage import provenance, write_json

COMMAND = "python benchmarks/parquet_data.py"


def train(tmp, *sets):
    """One ``raytopk train`` run: its summary, and the driver's peak resident memory in MB."""
    output = os.path.join(tmp, "summary.json")
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--workers",
        "2",
        "--checkpoint-dir",
        os.path.join(tmp, "runs"),
        "--output",
        output,
        "--restart",
    ]
    for pair in sets:
        command += ["--set", pair]
    with open(os.path.join(tmp, "train.log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed; its log: {log.name}")
    with open(output) as f:
        summary = json.load(f)
    os.remove(output)
    return summary, usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/parquet_data.json")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="parquet-bench-")
    try:
        fashion, mnist5k = os.path.join(tmp, "fashion"), os.path.join(tmp, "mnist5k")
        for name, path, layout in (
            ("fashion_mnist", fashion, "png"),
            ("mnist5k", mnist5k + "-png", "png"),
            ("mnist5k", mnist5k + "-list", "list"),
        ):
            subprocess.run(
                [sys.executable, "-m", "raytopk", "export", "--dataset", name, "--output", path, "--layout", layout],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        common = ["model=simple_cnn", "batch_size=64", "epochs=1", "method=topk", "ratio=0.01"]
        speed = {"torchvision": [], "parquet": []}
        for _ in range(args.repeats):
            speed["torchvision"].append(train(tmp, *common, "dataset=fashion_mnist")[0]["history"][0]["samples_per_s"])
            speed["parquet"].append(
                train(tmp, *common, "dataset=parquet", f"data_path={fashion}")[0]["history"][0]["samples_per_s"]
            )
        median = {path: statistics.median(values) for path, values in speed.items()}
        print(
            f"samples/s  torchvision {median['torchvision']:.0f}  parquet {median['parquet']:.0f}  "
            f"ratio {median['parquet'] / median['torchvision']:.2f}",
            flush=True,
        )

        scaled = os.path.join(tmp, "fashion-scaled")
        shutil.copytree(os.path.join(fashion, "test"), os.path.join(scaled, "test"))
        for copy in range(args.scale):
            shutil.copytree(os.path.join(fashion, "train"), os.path.join(scaled, "train", f"copy{copy}"))
        memory = []
        for path, rows in ((fashion, 60000), (scaled, 60000 * args.scale)):
            summary, peak = train(tmp, *common, "dataset=parquet", f"data_path={path}", "max_train_batches=50")
            memory.append(
                {"train_rows": rows, "driver_peak_mb": round(peak, 1), "test_accuracy": summary["test_accuracy"]}
            )
            print(f"driver peak {peak:.0f} MB with {rows} training rows", flush=True)

        accuracy = {}
        for label, sets in (
            ("built-in mnist5k", ["dataset=mnist5k"]),
            ("parquet png", ["dataset=parquet", f"data_path={mnist5k}-png"]),
            ("parquet list", ["dataset=parquet", f"data_path={mnist5k}-list", "image_shape=[1, 28, 28]"]),
        ):
            accuracy[label] = train(tmp, "epochs=3", *sets)[0]["test_accuracy"]
            print(f"mnist5k 3 epochs dense  {label}: {100 * accuracy[label]:.2f}%", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(
        args.output,
        {
            **provenance(
                COMMAND
                + "".join(
                    f" --{key} {getattr(args, key)}"
                    for key in ("repeats", "scale", "output")
                    if getattr(args, key) != parser.get_default(key)
                )
            ),
            "cpus": len(os.sched_getaffinity(0)),
            "speed": {
                "setup": "fashion_mnist, simple_cnn, 2 workers, batch 64, topk 0.01, 1 epoch",
                "samples_per_s": speed,
                "median": median,
                "ratio": median["parquet"] / median["torchvision"],
            },
            "driver_memory": memory,
            "driver_memory_growth": memory[1]["driver_peak_mb"] / memory[0]["driver_peak_mb"],
            "accuracy_mnist5k": accuracy,
        },
    )


if __name__ == "__main__":
    main()
