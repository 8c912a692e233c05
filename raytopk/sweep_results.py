"""What a sweep leaves behind: a row per trial, the pick of the best, a table, a plot, a job YAML.

Only trials that ran every epoch compete for "best": a trial ASHA stopped early
has seen fewer epochs and sent fewer bytes, so neither number compares. The
three ways to pick (``select`` in the sweep YAML):

* ``best``: the best value of the sweep's metric.
* ``budget``: the most accurate trial that sent at most ``max_mb_per_worker``.
* ``within``: the trial that sent the fewest bytes among those within
  ``within_points`` percentage points of the most accurate one.

Files, under the sweep's directory: ``trials.json`` (every trial),
``table.txt`` (the table printed on stdout), ``best.yaml`` (a job that
``raytopk train --config`` runs as it is) and ``accuracy_vs_bytes.png``.
"""

import dataclasses
import os
from typing import Optional

from raytopk.config import TrainConfig
from raytopk.storage import join, provenance, replacing, write_figure, write_json

__all__ = ["trial_config", "trial_rows", "pick_best", "pareto_front", "format_table", "write_results"]

TRIALS_FILE, TABLE_FILE, BEST_FILE, PLOT_FILE = "trials.json", "table.txt", "best.yaml", "accuracy_vs_bytes.png"


def trial_config(cfg: TrainConfig, sampled: dict) -> TrainConfig:
    """The job a trial trains: the base job with the sampled values."""
    return dataclasses.replace(cfg, **sampled)


def trial_rows(grid, cfg: TrainConfig) -> list:
    """One dict per trial of a Tune ``ResultGrid``: its sampled values, last metrics, status and job."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        job = trial_config(cfg, result.config)
        epochs = m.get("epoch", 0)
        status = "error" if result.error else ("done" if epochs == job.epochs else f"stopped at epoch {epochs}")
        sent = m.get("bytes_sent")
        rows.append(
            {
                "trial": m.get("trial_id") or os.path.basename(result.path),
                "params": dict(result.config),
                "status": status,
                "epochs": epochs,
                "test_accuracy": m.get("test_accuracy"),
                "loss": m.get("loss"),
                "bytes_sent": sent,
                "wire_mb_per_worker": sent / m.get("workers", job.workers) / 1e6 if sent is not None else None,
                "reduction": m.get("reduction"),
                "job": {k: v for k, v in dataclasses.asdict(job).items() if v is not None},
                "error": str(result.error).splitlines()[0] if result.error else None,
            }
        )
    return sorted(rows, key=lambda row: row["trial"])


def pick_best(rows: list, sweep):
    """The chosen finished row (see the module docstring), or None when none qualifies."""
    done = [row for row in rows if row["status"] == "done"]
    if sweep.select == "budget":
        done = [row for row in done if row["wire_mb_per_worker"] <= sweep.max_mb_per_worker]
    if not done:
        return None
    if sweep.select == "within":
        top = max(row["test_accuracy"] for row in done)
        near = [row for row in done if 100 * (top - row["test_accuracy"]) <= sweep.within_points + 1e-9]
        return min(near, key=lambda row: (row["bytes_sent"], -row["test_accuracy"]))
    sign = 1 if sweep.mode == "max" else -1
    return max(done, key=lambda row: (sign * row[sweep.metric], -row["bytes_sent"]))


def pareto_front(rows: list) -> list:
    """Finished rows that no other finished row beats on both accuracy and bytes, fewest bytes first."""
    front = []
    for row in sorted((r for r in rows if r["status"] == "done"), key=lambda r: (r["bytes_sent"], -r["test_accuracy"])):
        if not front or row["test_accuracy"] > front[-1]["test_accuracy"]:
            front.append(row)
    return front


def format_table(rows: list, best) -> str:
    """The results as a fixed-width table; ``*`` marks the chosen trial."""
    keys = sorted({k for row in rows for k in row["params"]})
    header = ["", "trial"] + keys + ["accuracy", "wire MB/worker", "reduction", "status"]
    lines = [header]
    for row in rows:
        acc, mb, red = row["test_accuracy"], row["wire_mb_per_worker"], row["reduction"]
        lines.append(
            [
                "*" if best is not None and row["trial"] == best["trial"] else "",
                row["trial"],
                *(
                    f"{row['params'][k]:.4g}" if isinstance(row["params"].get(k), float) else str(row["params"].get(k))
                    for k in keys
                ),
                f"{100 * acc:.2f}%" if acc is not None else "-",
                f"{mb:.2f}" if mb is not None else "-",
                f"{red:.1f}x" if red is not None else "-",
                row["status"],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    )


def _plot(rows: list, best, path: str, title: str) -> None:
    """Test accuracy against wire MB per worker: a point per trial (its colour the learning rate, its label the ratio),
    hollow for trials ASHA stopped, with the Pareto front of the finished trials and the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shown = [row for row in rows if row["test_accuracy"] is not None]
    lrs = [row["job"]["lr"] for row in shown]
    norm = LogNorm(min(lrs), max(lrs) * 1.0001)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _plot_trials(ax, shown, norm)
    _plot_front(ax, pareto_front(rows))
    if best is not None:
        _plot_chosen(ax, best)
    for row in shown:
        ax.annotate(
            f"{row['job']['ratio']:.2g}",
            (row["wire_mb_per_worker"], 100 * row["test_accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    _set_axes(fig, ax, norm, title)
    fig.tight_layout()
    write_figure(path, fig)


def _plot_trials(ax, shown: list, norm) -> None:
    """The trials, coloured by learning rate: filled if they ran every epoch, hollow if ASHA stopped them."""
    import matplotlib.pyplot as plt

    for finished, marker_face, label in ((True, None, "ran every epoch"), (False, "none", "stopped early by ASHA")):
        group = [row for row in shown if (row["status"] == "done") == finished]
        if not group:
            continue
        colors = plt.cm.viridis(norm([row["job"]["lr"] for row in group]))
        ax.scatter(
            [row["wire_mb_per_worker"] for row in group],
            [100 * row["test_accuracy"] for row in group],
            s=55,
            facecolors=colors if marker_face is None else marker_face,
            edgecolors=colors,
            linewidths=1.5,
            label=label,
        )


def _plot_front(ax, front: list) -> None:
    """The Pareto front (:func:`pareto_front`) as a staircase through red rings; nothing when it is empty."""
    if not front:
        return
    xs, ys = [row["wire_mb_per_worker"] for row in front], [100 * row["test_accuracy"] for row in front]
    ax.step(xs, ys, where="post", color="tab:red", linewidth=1)
    ax.scatter(
        xs,
        ys,
        s=140,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=1.2,
        label="Pareto front (finished trials)",
    )


def _plot_chosen(ax, best: dict) -> None:
    """The chosen trial, as a black star labelled with its ratio and learning rate."""
    ax.scatter(
        [best["wire_mb_per_worker"]],
        [100 * best["test_accuracy"]],
        marker="*",
        s=320,
        facecolors="none",
        edgecolors="black",
        label=f"chosen: ratio {best['job']['ratio']:.3g}, lr {best['job']['lr']:.3g}",
    )


def _set_axes(fig, ax, norm, title: str) -> None:
    """A log x axis with plain numbers, the axis labels and title, the learning rate's colour bar, legend and grid."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("wire MB per worker (log scale; labels: ratio)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="learning rate")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)


def write_results(directory: str, rows: list, sweep, cfg: TrainConfig, command: Optional[str] = None):
    """Write every result file under ``directory``; return the chosen row (None when none qualifies)."""
    import yaml

    best = pick_best(rows, sweep)
    selection = {
        "select": sweep.select,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_mb_per_worker": sweep.max_mb_per_worker,
        "within_points": sweep.within_points,
    }
    write_json(
        join(directory, TRIALS_FILE),
        {
            "sweep": sweep.name,
            **provenance(command),
            **selection,
            "best": best["trial"] if best else None,
            "trials": rows,
        },
    )
    with replacing(join(directory, TABLE_FILE)) as temporary, open(temporary, "w") as f:
        f.write(format_table(rows, best) + "\n")
    if best is not None:
        with replacing(join(directory, BEST_FILE)) as temporary, open(temporary, "w") as f:
            f.write(
                f"# Best trial {best['trial']} of sweep {sweep.name} (select: {sweep.select}): "
                f"test accuracy {100 * best['test_accuracy']:.2f}%, "
                f"{best['wire_mb_per_worker']:.2f} wire MB per worker.\n"
                f"# Train it with: raytopk train --config {BEST_FILE}\n"
            )
            yaml.safe_dump(best["job"], f, sort_keys=False)
    if any(row["test_accuracy"] is not None for row in rows):
        _plot(
            rows, best, join(directory, PLOT_FILE), f"{sweep.name}: {cfg.model} on {cfg.dataset}, {cfg.workers} workers"
        )
    return best
