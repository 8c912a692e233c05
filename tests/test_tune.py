"""Sweeps: config checks, the pick of the best trial, and real sweeps on a local Ray (run, best-job round trip,
resume)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raytopk.config import ConfigError, load_config
from raytopk.sweep_results import BEST_FILE, PLOT_FILE, TABLE_FILE, TRIALS_FILE, pareto_front, pick_best
from raytopk.tune import SWEEP_FILE, SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "jobs" / "smoke.yaml")


def _write(tmp_path, name="sweep", **values):
    spec = {
        "base": SMOKE,
        "train": {"epochs": 2, "cpus_per_worker": 0.5},
        "search_space": {"ratio": {"choice": [0.01, 0.001]}},
        "num_samples": 1,
        "storage_path": str(tmp_path / "runs"),
    }
    spec.update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _tune(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "raytopk", "tune", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_every_shipped_sweep_is_valid():
    sweeps = sorted(glob.glob(str(ROOT / "tune_configs" / "*.yaml")))
    assert len(sweeps) >= 2
    for path in sweeps:
        sweep, cfg = load_sweep(path)
        assert {"ratio", "lr"} <= set(sweep.search_space) and cfg.compress


@pytest.mark.parametrize(
    "values, fragment",
    [
        (
            {"search_space": {"ratio": {"loguniform": [0, 0.1]}}},
            "search_space.ratio: loguniform got [0, 0.1]; allowed: [low, high] with 0 < low < high",
        ),
        (
            {"search_space": {"ratio": {"uniform": [0.1, 0.01]}}},
            "search_space.ratio: uniform got [0.1, 0.01]; allowed: [low, high] with low < high",
        ),
        (
            {"search_space": {"ratio": {"loguniform": [0.001, 2]}}},
            "search_space.ratio: ratio: got 2; allowed: a number in (0, 1]",
        ),
        ({"search_space": {"lr": {"choice": [0.1, -1]}}}, "search_space.lr: lr: got -1; allowed: a number in (0, inf)"),
        (
            {"search_space": {"ratio": {"normal": [0.01, 0.1]}}},
            "search_space.ratio: got {'normal': [0.01, 0.1]}; allowed: one of loguniform, uniform, choice, grid",
        ),
        (
            {"search_space": {"ratio": {"choice": []}}},
            "search_space.ratio: choice got []; allowed: a non-empty list of values",
        ),
        (
            {"search_space": {"ratoi": {"choice": [0.1]}}},
            "search_space.ratoi: unknown job key; allowed: accumulate, amp, backend, batch_size",
        ),
        (
            {"search_space": {"epochs": {"uniform": [1, 3]}}, "train": {}},
            "search_space.epochs: uniform samples real numbers but epochs takes an integer; use choice or grid",
        ),
        ({"search_space": {"model": {"choice": ["vgg"]}}}, "search_space.model: model: got 'vgg'; allowed: resnet18"),
        ({"search_space": {"name": {"choice": ["a"]}}}, "name: set per trial by the sweep"),
        ({"search_space": {}}, "search_space: got nothing"),
        ({"scheduler": "hyperband"}, "scheduler: got 'hyperband'; allowed: asha, none"),
        ({"reduction_factor": 1}, "reduction_factor: got 1; allowed: a number in (1, inf)"),
        ({"grace_period": 3}, "grace_period: got 3; allowed: at most the trials' epochs (2)"),
        ({"num_samples": 0}, "num_samples: got 0; allowed: a number in [1, inf)"),
        ({"mode": "min"}, "mode: got 'min' for metric test_accuracy; allowed: max"),
        ({"select": "budget"}, "max_mb_per_worker: got null with select: budget"),
        ({"select": "cheapest"}, "select: got 'cheapest'; allowed: best, budget, within"),
        ({"num_sample": 4}, "unknown key 'num_sample'; allowed keys:"),
        ({"train": {"batch_size": 0}}, "train: batch_size: got 0; allowed: a number in [1, inf)"),
        ({"base": "no/such.yaml"}, "config file not found:"),
        ({"base": ""}, "base: missing"),
        ({"train": {"ratio": 0.01}}, "train.ratio: got 0.01, but search_space.ratio samples it for each trial"),
    ],
)
def test_bad_sweeps_name_the_value_and_what_is_allowed(tmp_path, values, fragment):
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, **values))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_sweep_of_compression_keys_over_a_job_that_does_not_compress_is_refused(tmp_path):
    """Every trial would train dense; a sweep that says compress itself (or sweeps it) is fine."""
    dense = tmp_path / "dense.yaml"
    dense.write_text("epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, base=str(dense)))
    assert "ratio: got {'choice': [0.01, 0.001]}, but compress is false, so nothing uses it" in str(err.value)
    load_sweep(_write(tmp_path, base=str(dense), train={"compress": True}))
    load_sweep(_write(tmp_path, base=str(dense), search_space={"compress": {"choice": [True, False]}}))


def test_set_overrides_sweep_and_job_keys(tmp_path):
    sweep, cfg = load_sweep(_write(tmp_path), {"num_samples": 3, "lr": 0.2, "epochs": 1, "grace_period": 1})
    assert sweep.num_samples == 3 and cfg.lr == 0.2 and cfg.epochs == 1
    assert sweep.name == "sweep" and os.path.isabs(sweep.base)
    with pytest.raises(ConfigError, match="--set colour: unknown key"):
        load_sweep(_write(tmp_path), {"colour": 1})
    # a key the sweep samples: the sample would win over the value, so the value is refused
    with pytest.raises(ConfigError, match=r"^--set ratio: got 0.001, but search_space.ratio samples it for each trial"):
        load_sweep(_write(tmp_path), {"ratio": 0.001})
    sweep, cfg = load_sweep(_write(tmp_path), {"ratio": 0.001, "search_space": {"lr": {"choice": [0.1, 0.2]}}})
    assert cfg.ratio == 0.001 and list(sweep.search_space) == ["lr"]


def test_cli_bad_sweep_is_one_line_exit_2(tmp_path):
    done = _tune(_write(tmp_path, scheduler="hyperband"), "--set", "ratio=3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "scheduler: got 'hyperband'" in done.stderr
    assert not (tmp_path / "runs").exists()


def _row(trial, acc, mb, status="done"):
    return {
        "trial": trial,
        "status": status,
        "test_accuracy": acc,
        "loss": 1 - acc,
        "bytes_sent": mb * 2e6,
        "wire_mb_per_worker": mb,
    }


ROWS = [
    _row("a", 0.970, 40.0),
    _row("b", 0.968, 10.0),
    _row("c", 0.960, 2.0),
    _row("d", 0.950, 5.0),
    _row("e", 0.990, 1.0, "stopped at epoch 1"),
]


@pytest.mark.parametrize(
    "select, extra, expected",
    [
        ("best", {}, "a"),  # the stopped trial "e" is more accurate but ran fewer epochs
        ("budget", {"max_mb_per_worker": 20}, "b"),
        ("budget", {"max_mb_per_worker": 5}, "c"),
        ("budget", {"max_mb_per_worker": 0.5}, None),
        ("within", {"within_points": 0.5}, "b"),
        ("within", {"within_points": 1.0}, "c"),
        ("within", {"within_points": 0}, "a"),
    ],
)
def test_pick_best(select, extra, expected):
    sweep = SweepConfig(base="x", search_space={"ratio": {"choice": [0.1]}}, select=select, **extra)
    best = pick_best(ROWS, sweep)
    assert (best["trial"] if best else None) == expected


def test_pick_best_by_loss_takes_the_lowest():
    sweep = SweepConfig(base="x", search_space={"ratio": {"choice": [0.1]}}, metric="loss", mode="min")
    assert pick_best(ROWS, sweep)["trial"] == "a"


def test_pareto_front_keeps_only_undominated_finished_trials():
    assert [row["trial"] for row in pareto_front(ROWS)] == ["c", "b", "a"]


@pytest.mark.integrations  # a whole sweep, then its best job trained: Ray Tune as users run it
def test_sweep_writes_table_best_job_and_plot_and_the_best_job_trains(tmp_path):
    path = _write(
        tmp_path,
        search_space={"ratio": {"grid": [0.01, 0.001]}, "lr": {"loguniform": [0.01, 0.1]}},
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        max_concurrent_trials=2,
    )
    done = _tune(path)
    assert done.returncode == 0, done.stderr[-3000:]
    directory = tmp_path / "runs" / "sweep"
    results = json.loads((directory / TRIALS_FILE).read_text())
    rows = results["trials"]
    assert len(rows) == 2 and {row["params"]["ratio"] for row in rows} == {0.01, 0.001}
    assert all(row["status"] in ("done", "stopped at epoch 1") for row in rows)
    best = next(row for row in rows if row["trial"] == results["best"])
    # 40 steps of SimpleCNN reach 60-80% here; a model the sweep never updated stays near 10%.
    assert best["status"] == "done" and best["epochs"] == 2 and 0.5 < best["test_accuracy"] <= 1
    assert (
        0 < best["bytes_sent"] < best["epochs"] * 2 * 20 * 4 * 421642
    )  # below dense: 2 workers x 20 steps x fp32 params
    table = (directory / TABLE_FILE).read_text()
    assert table in done.stdout and f"*  {best['trial']}" in table
    assert (directory / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    job = load_config(str(directory / BEST_FILE))
    assert job == load_config(**best["job"]) and job.ratio == best["params"]["ratio"] and job.lr == best["params"]["lr"]
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytopk",
            "train",
            "--config",
            str(directory / BEST_FILE),
            "--epochs",
            "1",
            "--checkpoint-dir",
            str(tmp_path / "best"),
            "--output",
            str(tmp_path / "best.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "best.json").read_text())
    assert summary["ratio"] == best["params"]["ratio"] and summary["epochs"] == 1

    again = _tune(path)  # the same name again: refused, the results stay
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert json.loads((directory / TRIALS_FILE).read_text()) == results


# A sweep on one's own Parquet data: each trial's driver hands Ray Data's datasets to its trainer.
@pytest.mark.integrations
def test_sweep_on_parquet_data(tmp_path):
    from raytopk.parquet import export

    export("mnist5k", str(tmp_path / "digits"), "list")
    path = _write(
        tmp_path,
        name="own",
        train={
            "epochs": 1,
            "cpus_per_worker": 0.5,
            "dataset": "parquet",
            "data_path": str(tmp_path / "digits"),
            "image_shape": [1, 28, 28],
        },
        search_space={"ratio": {"grid": [0.01, 0.001]}},
        scheduler="none",
        max_concurrent_trials=1,
    )
    done = _tune(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raytopk: sweep own: 2 trials of simple_cnn on parquet over ratio, 1 epoch each;" in done.stdout
    rows = json.loads((tmp_path / "runs" / "own" / TRIALS_FILE).read_text())["trials"]
    assert [row["status"] for row in rows] == ["done", "done"]
    # 20 steps of SimpleCNN on the digits: well above chance (10%) when the workers read the shards and trained
    assert all(0.4 < row["test_accuracy"] <= 1 for row in rows) and len({row["bytes_sent"] for row in rows}) == 2


@pytest.mark.faults
def test_interrupted_sweep_resumes_each_trial_from_its_checkpoint(tmp_path):
    """Stored through a URI (as on S3 in a cluster): Tune's state, the trials' checkpoints and the results."""
    path = _write(
        tmp_path,
        name="resumable",
        train={"epochs": 3, "cpus_per_worker": 0.5},
        search_space={"ratio": {"grid": [0.01, 0.001]}},
        scheduler="none",
        max_concurrent_trials=1,
        storage_path=f"file://{tmp_path / 'runs'}",
    )
    directory = tmp_path / "runs" / "resumable"
    assert _tune(path, "--resume").returncode == 2  # nothing to resume yet
    process = subprocess.Popen(
        [sys.executable, "-m", "raytopk", "tune", path],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not glob.glob(str(directory / "trials" / "*" / "checkpoint_*")) and time.time() < deadline:
            time.sleep(0.5)
        assert glob.glob(str(directory / "trials" / "*" / "checkpoint_*")), "no trial checkpointed in time"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and "continue it with --resume" in stderr, stderr[-3000:]
    assert (directory / SWEEP_FILE).exists() and not (directory / TRIALS_FILE).exists()

    done = _tune(path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((directory / TRIALS_FILE).read_text())["trials"]
    assert [row["status"] for row in rows] == ["done", "done"] and [row["epochs"] for row in rows] == [3, 3]
    first = sorted(glob.glob(str(directory / "train_trial_*" / "result.json")))[0]
    epochs = [json.loads(line)["epoch"] for line in open(first)]
    assert epochs[-1] == 3 and epochs[0] > 1, epochs  # continued from a checkpoint, not from epoch 1
