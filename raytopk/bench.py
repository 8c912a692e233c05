"""What ``raytopk bench`` shows of its runs (the same job dense and with top-k): a table, and a plot beside
``--output``."""

import posixpath

from raytopk.storage import write_figure

__all__ = ["method_label", "format_table", "plot_path", "write_plot"]


def method_label(row: dict) -> str:
    """``dense``, or ``top-k <ratio>``: the method of a run's summary."""
    return f"top-k {row['ratio']:g}" if row["compress"] else "dense"


def format_table(rows: list) -> str:
    """The runs side by side; with several nodes the bytes across node cards (all workers) get a column."""
    lines = [f"{'method':<14}{'test acc':>10}{'wire MB/worker':>16}{'network MB':>12}{'reduction':>11}{'wall s':>8}"]
    for row in rows:
        network = f"{row['network_bytes'] / 1e6:>12.2f}" if row["nodes"] > 1 else f"{'one node':>12}"
        lines.append(
            f"{method_label(row):<14}{100 * row['test_accuracy']:>9.2f}%{row['wire_mb_per_worker']:>16.2f}{network}"
            f"{row['reduction']:>10.1f}x{'-' if row['wall_s'] is None else round(row['wall_s']):>8}"
        )
    return "\n".join(lines)


def plot_path(output: str) -> str:
    """The plot's path: ``--output`` with ``.png`` for its extension (``runs/demo.json`` -> ``runs/demo.png``)."""
    return posixpath.splitext(output)[0] + ".png"


def write_plot(rows: list, path: str) -> None:
    """Test accuracy per epoch, and wire MB per worker, for each run; written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, wire) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    labels = [method_label(row) for row in rows]
    for row, label in zip(rows, labels):
        history = row["history"]
        accuracy.plot(
            [m["epoch"] for m in history], [100 * m["test_accuracy"] for m in history], marker="o", label=label
        )
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("test accuracy (%)")
    accuracy.xaxis.get_major_locator().set_params(integer=True)
    accuracy.legend()
    accuracy.grid(alpha=0.3)
    bars = wire.bar(labels, [row["wire_mb_per_worker"] for row in rows], color=[f"C{i}" for i in range(len(rows))])
    wire.bar_label(bars, fmt="%.2f")
    wire.set_ylabel("wire MB per worker (whole run)")
    wire.margins(y=0.12)  # room for the labels
    wire.grid(axis="y", alpha=0.3)
    first = rows[0]
    fig.suptitle(f"{first['model']} on {first['dataset']}, {first['workers']} workers, {first['epochs']} epochs")
    fig.tight_layout()
    write_figure(path, fig)
