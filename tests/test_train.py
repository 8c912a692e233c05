"""The Ray Train service end to end on a real local Ray: metrics, checkpoints, TensorBoard, resume, a killed worker."""

import glob
import os
import signal
import threading
import time

import pytest
import torch

from raytopk.config import load_config
from raytopk.models import build_model
from raytopk.train import MODEL_FILE, rank_file, run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _cfg(tmp_path, name, **overrides):
    values = dict(dataset="mnist5k", epochs=2, batch_size=32, workers=2, compress=True, ratio=0.01,
                  checkpoint_dir=str(tmp_path), name=name, max_failures=2)
    values.update(overrides)
    return load_config(**values)


def _weights(checkpoint_path):
    return torch.load(os.path.join(checkpoint_path, MODEL_FILE), weights_only=True)


@pytest.fixture(scope="module")
def straight(local_ray, tmp_path_factory):
    """An uninterrupted 2-epoch compressed run: the reference for resume and recovery."""
    tmp = tmp_path_factory.mktemp("straight")
    return run(_cfg(tmp, "straight", tensorboard=True, output=str(tmp / "summary.json")))


def test_compressed_run_reports_checkpoints_and_tensorboard(straight):
    assert straight["epochs"] == 2 and straight["test_accuracy"] > 0.8
    assert straight["reduction"] > 10 and straight["bytes_sent"] < straight["dense_bytes"]
    assert os.path.isfile(os.path.join(os.path.dirname(straight["run_dir"]), "summary.json"))
    files = set(os.listdir(straight["checkpoint"]))
    assert {MODEL_FILE, "optimizer.pt", "meta.json", rank_file(0), rank_file(1)} <= files
    residuals = [torch.load(os.path.join(straight["checkpoint"], rank_file(r)), weights_only=True)["hook"]["residuals"] for r in (0, 1)]
    name = next(iter(residuals[0]))
    assert residuals[0][name].abs().sum() > 0 and not torch.equal(residuals[0][name], residuals[1][name])
    assert glob.glob(os.path.join(straight["run_dir"], "tensorboard", "events.out.tfevents.*"))


def test_dense_run_matches_compressed_accuracy_closely(local_ray, tmp_path, straight):
    dense = run(_cfg(tmp_path, "dense", compress=False))
    assert dense["reduction"] == pytest.approx(1.0)
    assert abs(dense["test_accuracy"] - straight["test_accuracy"]) < 0.03


def test_resumed_run_matches_the_uninterrupted_one(local_ray, tmp_path, straight):
    first = run(_cfg(tmp_path, "resumed", epochs=1))
    assert first["epochs"] == 1
    second = run(_cfg(tmp_path, "resumed"))  # same name: continues from the epoch-1 checkpoint
    assert second["epochs"] == 2
    for key, value in _weights(straight["checkpoint"]).items():
        assert torch.equal(_weights(second["checkpoint"])[key], value), key


def test_killed_worker_restarts_from_checkpoint_and_finishes_the_same(local_ray, tmp_path, straight):
    from ray.util.state import list_actors

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run(_cfg(tmp_path, "killed"))))
    thread.start()
    deadline = time.time() + 180
    while not glob.glob(str(tmp_path / "killed" / "checkpoint_*")) and time.time() < deadline:
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    assert thread.is_alive(), "the run finished before a worker could be killed"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome.get("epochs") == 2, "the run did not finish after the worker died"
    for key, value in _weights(straight["checkpoint"]).items():
        assert torch.equal(_weights(outcome["checkpoint"])[key], value), key


def test_accumulation_runs_the_hook_once_per_step_under_bf16_autocast(local_ray, tmp_path):
    # Dense (start_iter beyond the run) so every hook call sends the whole model: the bytes count the calls.
    summary = run(_cfg(tmp_path, "accumulate", model="vit", epochs=1, max_train_batches=6, accumulate=3, amp="bf16", start_iter=100))
    model_bytes = 4 * sum(p.numel() for p in build_model("vit").parameters())
    assert summary["bytes_sent"] == summary["dense_bytes"] == 2 * 2 * model_bytes  # 6 / 3 steps, 2 workers
    assert summary["loss"] == summary["loss"]  # finite, not NaN


def test_dgc_options_train_a_vit_with_fewer_bytes(local_ray, tmp_path):
    summary = run(_cfg(tmp_path, "dgc", model="vit", epochs=2, max_train_batches=8, accumulate=2, ratio=0.01, start_iter=1,
                       warmup_ratio=0.25, warmup_epochs=1, momentum_correction=True, clip_norm=5.0, per_layer=True,
                       dense_below=256))
    assert 0 < summary["loss"] < 10 and summary["reduction"] > 2
