"""Autoscaling and node loss on Ray's fake multinode provider: real raylets as nodes, launched and removed by the
autoscaler from clusters/local.yaml. A node is lost the way a machine is: its raylet and every process under it
SIGKILLed at once."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from raytopk.checkpoint import MODEL_FILE, SNAPSHOT_FILE

from cluster import FAKE_GCS, fake_cluster, joined_node, lose_node, one_gpu_nodes, ray_list

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = ROOT / "clusters" / "local.yaml"
pytestmark = pytest.mark.faults


def _worker_nodes(head, state="ALIVE") -> list:
    return [node for node in ray_list(*head, "nodes", f"state={state}") if not node.get("is_head_node")]


def _lose_node_of_a_worker(head) -> str:
    """Lose the node of a live training worker (:func:`cluster.lose_node`); return its id.

    The run's console channel lives on the driver's node (the head), so that this loss leaves it standing.
    """
    workers = ray_list(*head, "actors", "class_name=RayTrainWorker", "state=ALIVE")
    assert workers, "no live training worker"
    channels = {actor["node_id"] for actor in ray_list(*head, "actors", "class_name=_Mailbox", "state=ALIVE")}
    assert channels == {node["node_id"] for node in ray_list(*head, "nodes") if node["is_head_node"]}, channels
    lose_node(workers[-1]["node_id"])
    return workers[-1]["node_id"]


def _train(head, checkpoint_dir, name, *flags):
    """``raytopk train`` against the fake cluster's GCS, as a user on the head runs it (started, not waited for)."""
    env = dict(head[1], RAY_ADDRESS=FAKE_GCS)
    command = [
        sys.executable,
        "-m",
        "raytopk",
        "train",
        "--config",
        str(ROOT / "jobs" / "local_cluster.yaml"),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--name",
        name,
        "--output",
        str(checkpoint_dir / f"{name}.json"),
        *flags,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _wait_for(process, pattern: str, lines: list, timeout: float) -> None:
    """Read ``process``'s output into ``lines`` until a line matches ``pattern``."""
    deadline, start = time.time() + timeout, len(lines)
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line) or time.time() > deadline:
            break
    assert re.search(pattern, "".join(lines[start:])), "".join(lines)[-3000:]  # a line printed while waiting


def _finish(process, lines: list, timeout: float = 600, returncode: int = 0) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(lines) + out
    assert process.returncode == returncode, text[-4000:]
    return text


def _final_meta(run_dir: Path) -> dict:
    latest = json.loads((run_dir / SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    return json.loads((run_dir / latest / "meta.json").read_text())


def _epoch_lines(text: str) -> dict:
    """Each epoch number the driver printed, with the distinct lines it printed for it (the fake nodes share one log
    directory, so each node's log monitor forwards every line once)."""
    seen = {}
    for line in text.splitlines():
        match = re.search(r"(epoch (\d+)/\d+ .*)$", line)
        if match:
            seen.setdefault(int(match.group(2)), set()).add(match.group(1))
    return seen


def test_a_job_scales_the_cluster_up_from_zero_and_its_nodes_go_when_idle(tmp_path):
    """clusters/local.yaml as shipped, the job as shipped, through submit.py: no worker node until the job asks."""
    with fake_cluster(str(LOCAL_CLUSTER)) as head:
        assert _worker_nodes(head) == []
        summary = tmp_path / "summary.json"
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "submit.py"),
                "jobs/local_cluster.yaml",
                "--address",
                head[0],
                "--set",
                "epochs=2",
                "--set",
                "max_train_batches=10",
                "--set",
                f"checkpoint_dir={tmp_path}",
                "--set",
                f"output={summary}",
            ],
            capture_output=True,
            text=True,
            timeout=420,
            env=head[1],
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads(summary.read_text())
        assert result["epochs"] == 2 and [m["epoch"] for m in result["history"]] == [1, 2]
        launched = _worker_nodes(head, "ALIVE") + _worker_nodes(head, "DEAD")
        assert launched, "no worker node was launched"
        assert {node["resources_total"].get("fake_gpu") for node in launched} <= {1.0, 4.0}
        deadline = time.time() + 180
        while _worker_nodes(head) and time.time() < deadline:
            time.sleep(3)
        assert _worker_nodes(head) == [], "idle worker nodes were not removed"


@pytest.fixture(scope="module")
def spare_nodes(tmp_path_factory):
    """Room for more nodes than a job needs: a lost node is replaced within seconds."""
    with fake_cluster(one_gpu_nodes(str(LOCAL_CLUSTER), str(tmp_path_factory.mktemp("cluster")), 16)) as head:
        yield head


def _wait_for_node(head, resource: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not any(node["resources_total"].get(resource) for node in _worker_nodes(head)):
        assert time.time() < deadline, f"no node with {resource} joined"
        time.sleep(1)


def test_elastic_run_goes_on_without_a_lost_node_and_grows_when_a_node_joins(tmp_path):
    """At most 3 autoscaled nodes, all 3 in use. A lost node keeps its place on the fake provider while the run's
    resource request stands, so no replacement comes: the run must go on with 2 workers. (Ray Train first waits
    for a third worker that cannot come; after 20 s it re-plans with what the cluster holds.) Then a node joins by
    hand, as a user adds a machine, and the run grows back to 3. The run has more epochs than the test waits for,
    so a slow machine cannot end it before the node joins; once it has trained 2 epochs at 3 again, Ctrl+C stops
    it, and its last checkpoint holds the history."""
    epochs = 1000
    with fake_cluster(one_gpu_nodes(str(LOCAL_CLUSTER), str(tmp_path), 3)) as head:
        process = _train(
            head, tmp_path, "elastic", "--epochs", str(epochs), "--max-train-batches", "4", "--resize-interval-s", "10"
        )
        lines = []
        _wait_for(process, rf"epoch 3/{epochs} .*3 workers", lines, timeout=240)
        _lose_node_of_a_worker(head)
        _wait_for(process, rf"epoch \d+/{epochs} .*2 workers", lines, timeout=120)
        shrunk = max(int(m[1]) for line in lines if (m := re.search(rf"epoch (\d+)/{epochs} ", line)))
        with joined_node(head[1], "--num-cpus=1", "--resources='{\"fake_gpu\": 1}'"):
            # A joining node's log monitor forwards the shared log's old lines again: count only epochs after the
            # shrink.
            grown = re.compile(rf"epoch (\d+)/{epochs} .*3 workers")
            while (
                len({m[1] for line in lines if (m := grown.search(line)) and int(m[1]) > shrunk}) < 3
            ):  # the first at 3, 2 more
                _wait_for(process, grown.pattern, lines, timeout=240)
            process.send_signal(signal.SIGINT)
            text = _finish(process, lines, timeout=120, returncode=130)

    history = _final_meta(tmp_path / "elastic")["history"]
    assert [m["epoch"] for m in history] == list(range(1, len(history) + 1))  # none skipped, each once
    workers = [m["workers"] for m in history]
    first_at_2 = workers.index(2)
    assert set(workers[:first_at_2]) == {3} and workers[-1] == 3, workers
    resizes = [(m["resized_from"], m["workers"]) for m in history if "resized_from" in m]
    assert resizes == [(3, 2), (2, 3)], resizes
    for m in history:  # the mean residual the new group holds is the saved workers' mean, to float32 rounding
        assert m.get("residual_mean_error", 0.0) < 1e-6, m
        # The linear rule: the job's lr (0.05) is for 3 workers; a group of W uses W/3 of it, on the same cosine
        # schedule (each epoch records the rate it trained at).
        assert m["lr"] == pytest.approx(
            0.05 * m["workers"] / 3 * 0.5 * (1 + math.cos(math.pi * (m["epoch"] - 1) / epochs))
        ), m
    # Bytes keep counting across resizes; each epoch that trained was printed once (no epoch trained twice).
    assert all(b["bytes_sent"] > a["bytes_sent"] for a, b in zip(history, history[1:]))
    printed = _epoch_lines(text)  # the epoch after the last checkpoint may have been printed as Ctrl+C came
    assert sorted(printed)[: len(history)] == list(range(1, len(history) + 1)) and all(
        len(seen) == 1 for seen in printed.values()
    ), printed
    assert "resized: 3 -> 2 workers" in text and "resized: 2 -> 3 workers" in text


def _weights(run_dir: Path) -> dict:
    latest = json.loads((run_dir / SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    return torch.load(run_dir / latest / MODEL_FILE, weights_only=True)


def test_fixed_size_run_restarts_on_the_replacement_node_and_ends_as_if_uninterrupted(spare_nodes, tmp_path):
    head = spare_nodes
    fixed = ("--min-workers", "0", "--epochs", "6", "--max-train-batches", "15")
    _finish(_train(head, tmp_path, "straight", *fixed), [])
    process = _train(head, tmp_path, "interrupted", *fixed)
    lines = []
    _wait_for(process, r"epoch 2/6 ", lines, timeout=240)
    lost = _lose_node_of_a_worker(head)
    text = _finish(process, lines)
    # it did fail and restart: raytopk says so in one line (Ray's own RETRY lines stay in its log directory)
    assert "Ray Train restarts the workers from the last checkpoint" in text, text[-3000:]
    history = _final_meta(tmp_path / "interrupted")["history"]
    assert [m["workers"] for m in history] == [3] * 6
    assert lost not in {node["node_id"] for node in _worker_nodes(head)}
    straight, interrupted = _weights(tmp_path / "straight"), _weights(tmp_path / "interrupted")
    for key, value in straight.items():
        assert torch.equal(interrupted[key], value), key


def test_a_sweep_spreads_its_trials_over_the_nodes_the_autoscaler_brings_up(spare_nodes, tmp_path):
    head = spare_nodes
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "jobs" / "local_cluster.yaml"),
                "train": {"epochs": 2, "workers": 1, "min_workers": 0, "max_train_batches": 10},
                "search_space": {"ratio": {"grid": [0.01, 0.001]}},
                "scheduler": "none",
                "num_samples": 1,
                "max_concurrent_trials": 2,
                "storage_path": str(tmp_path / "runs"),
                "name": "spread",
            }
        )
    )
    before = {actor["actor_id"] for actor in ray_list(*head, "actors", "class_name=RayTrainWorker")}
    done = subprocess.run(
        [sys.executable, "-m", "raytopk", "tune", str(sweep), "--address", FAKE_GCS],
        capture_output=True,
        text=True,
        timeout=420,
        env=head[1],
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "spread" / "trials.json").read_text())["trials"]
    assert [row["status"] for row in rows] == ["done", "done"]
    ours = [
        actor for actor in ray_list(*head, "actors", "class_name=RayTrainWorker") if actor["actor_id"] not in before
    ]
    assert len(ours) == 2 and len({actor["node_id"] for actor in ours}) == 2, (
        ours
    )  # one worker per trial, each on its own node


@pytest.mark.skipif(os.geteuid() != 0, reason="a node with its own file system needs a mount namespace (root)")
def test_a_local_checkpoint_dir_that_a_node_cannot_see_is_refused_in_one_line(spare_nodes, tmp_path):
    """A node joined from a private mount namespace, with an empty file system over checkpoint_dir: what a second
    machine without NFS sees. A worker there stops the run, and the driver says why in one line, exit 2."""
    head = spare_nodes
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    mount = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs tmpfs {checkpoints} && exec "$0" "$@"',
    ]
    with joined_node(head[1], "--num-cpus=1", "--resources='{\"elsewhere\": 1}'", prefix=mount):
        _wait_for_node(head, "elsewhere")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "raytopk",
                "train",
                "--config",
                str(ROOT / "jobs" / "local_cluster.yaml"),
                "--workers",
                "1",
                "--min-workers",
                "0",
                "--max-failures",
                "0",
                "--epochs",
                "1",
                "--set",
                "resources_per_worker={elsewhere: 1}",
                "--checkpoint-dir",
                str(checkpoints),
                "--name",
                "unseen",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(head[1], RAY_ADDRESS=FAKE_GCS),
            cwd=ROOT,
        )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"raytopk: error: checkpoint_dir: {checkpoints} is not seen from the node of worker rank 0; allowed on a "
        "cluster of several nodes: a URI (s3://, gs://) or a path every node mounts (NFS)"
    ), done.stderr[-3000:]
