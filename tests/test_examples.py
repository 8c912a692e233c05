"""The examples run as the README says, on real processes: torchrun with gloo (no Ray), and a hand-written Ray Train
loop."""

from pathlib import Path

import pytest
import torch

from scripts import example

pytestmark = pytest.mark.integrations


def _torchrun(*args) -> list:
    """``torchrun --standalone --nproc_per_node 2 examples/torchrun_ddp.py ARGS``: rank 0's JSON line per epoch."""
    return example("torchrun_ddp.py", *args, torchrun=True)


def test_torchrun_example_trains_sparse_and_resumes_exactly(tmp_path):
    straight = _torchrun("--epochs", "3", "--checkpoint", str(tmp_path / "straight"))
    last = straight[-1]
    assert last["epoch"] == 3 and last["test_accuracy"] >= 0.90, last
    assert [e["hook_steps"] for e in straight] == [e["optimizer_steps"] for e in straight]  # the hook ran once per step
    # After the first epoch (the two dense warm-up steps are in it): at most 3% of dense DDP's bytes at ratio 0.01.
    assert (last["bytes_sent"] - straight[0]["bytes_sent"]) <= 0.03 * (last["dense_bytes"] - straight[0]["dense_bytes"])

    assert [e["epoch"] for e in _torchrun("--epochs", "2", "--checkpoint", str(tmp_path / "resumed"))] == [1, 2]
    resumed = _torchrun("--epochs", "3", "--checkpoint", str(tmp_path / "resumed"))
    assert [e["epoch"] for e in resumed] == [3] and resumed[-1] == last  # same accuracy, bytes and step counts
    for name in ("model.pt", "rank0.pt", "rank1.pt"):  # the weights, and each rank's residual, bit for bit
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)
        for key, value in (a["hook"]["residuals"] if "hook" in a else a).items():
            other = b["hook"]["residuals"][key] if "hook" in b else b[key]
            assert torch.equal(value, other), (name, key)


def _ray_loop(storage, *args) -> dict:
    """``python examples/ray_train_loop.py ARGS`` on a local Ray: the last epoch's metrics."""
    return example("ray_train_loop.py", "--storage-path", storage, *args, timeout=400)[-1]


def _latest_checkpoint(run_dir) -> Path:
    return max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)


def test_ray_train_loop_example_trains_sparse_and_resumes_every_rank_exactly(tmp_path):
    straight = _ray_loop(tmp_path, "--epochs", "3", "--name", "straight")
    assert straight["epoch"] == 3 and straight["test_accuracy"] >= 0.90, straight
    assert straight["hook_steps"] == straight["optimizer_steps"] > 0  # the hook ran once per step
    two = _ray_loop(tmp_path, "--epochs", "2", "--name", "resumed")
    # The third epoch (long after the two dense warm-up steps): at most 3% of dense DDP's bytes at ratio 0.01.
    assert straight["bytes_sent"] - two["bytes_sent"] <= 0.03 * (straight["dense_bytes"] - two["dense_bytes"])
    assert (
        _ray_loop(tmp_path, "--epochs", "3", "--name", "resumed") == straight
    )  # Ray resumed it: same accuracy, bytes, steps
    a, b = _latest_checkpoint(tmp_path / "straight"), _latest_checkpoint(tmp_path / "resumed")
    for name in ("model.pt", "rank0.pt", "rank1.pt"):  # the weights, and each rank's residual, bit for bit
        x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        for key, value in (x["hook"]["residuals"] if "hook" in x else x).items():
            assert torch.equal(value, y["hook"]["residuals"][key] if "hook" in y else y[key]), (name, key)


def test_ray_prepare_model_compresses_with_one_worker(tmp_path):
    """Ray's own prepare_model gives one worker a bare model (no hook to register); raytopk's gives DDP with the
    hook."""
    one = _ray_loop(tmp_path, "--epochs", "1", "--workers", "1", "--name", "one")
    assert one["hook_steps"] == one["optimizer_steps"] > 0
