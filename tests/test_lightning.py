"""raytopk.lightning.TopKCompression on a real Lightning Trainer: strategy="ddp", accelerator="cpu", devices=2 (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")  # the optional extra raytopk[lightning]; the test extra installs it

ROOT = Path(__file__).resolve().parent.parent


def _run(*args) -> dict:
    """``examples/lightning_mnist.py ARGS`` as the README runs it: rank 0's summary line."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_mnist.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_lightning_callback_compresses_on_cpu_and_resumes_every_rank_exactly(tmp_path):
    straight = _run("--epochs", "3", "--checkpoint-dir", str(tmp_path / "straight"))
    assert straight["epochs"] == 3 and straight["test_accuracy"] >= 0.90, straight
    assert straight["hook_steps"] == straight["optimizer_steps"] > 0  # registered on CPU, once per step
    two = _run("--epochs", "2", "--checkpoint-dir", str(tmp_path / "resumed"))
    assert two["epochs"] == 2
    # The third epoch (long after the two dense warm-up steps): at most 3% of dense DDP's bytes at ratio 0.01.
    assert straight["raytopk/bytes_sent"] - two["raytopk/bytes_sent"] <= 0.03 * (straight["raytopk/dense_bytes"] - two["raytopk/dense_bytes"])
    resumed = _run("--epochs", "3", "--checkpoint-dir", str(tmp_path / "resumed"), "--resume")
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert len(a["raytopk"]) == 2  # every rank's hook state, gathered into rank 0's checkpoint
    for rank in range(2):
        for name, residual in a["raytopk"][rank]["residuals"].items():
            assert torch.equal(residual, b["raytopk"][rank]["residuals"][name]), (rank, name)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
