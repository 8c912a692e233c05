"""raytopk.lightning.TopKCompression on a real Lightning Trainer: strategy="ddp", accelerator="cpu", devices=2
(gloo)."""

import sys

import lightning  # noqa: F401  (the optional extra raytopk[lightning]; the test extra installs it, and pytorch-lightning)
import pytest
import torch

from scripts import example, json_lines

pytestmark = pytest.mark.integrations


def _run(*args) -> dict:
    """``examples/lightning_mnist.py ARGS`` as the README runs it: rank 0's summary line."""
    return example("lightning_mnist.py", *args)[-1]


def test_lightning_callback_compresses_on_cpu_and_resumes_every_rank_exactly(tmp_path):
    straight = _run("--epochs", "3", "--checkpoint-dir", str(tmp_path / "straight"))
    assert straight["epochs"] == 3 and straight["test_accuracy"] >= 0.90, straight
    assert straight["hook_steps"] == straight["optimizer_steps"] > 0  # registered on CPU, once per step
    two = _run("--epochs", "2", "--checkpoint-dir", str(tmp_path / "resumed"))
    assert two["epochs"] == 2
    # The third epoch (long after the two dense warm-up steps): at most 3% of dense DDP's bytes at ratio 0.01.
    assert straight["raytopk/bytes_sent"] - two["raytopk/bytes_sent"] <= 0.03 * (
        straight["raytopk/dense_bytes"] - two["raytopk/dense_bytes"]
    )
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


PYTORCH_LIGHTNING_SCRIPT = """
import json, sys
sys.modules["lightning"] = None  # a machine with only the older package: "import lightning" fails
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from raytopk.lightning import TopKCompression

class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 1)
    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

pl.seed_everything(0)
data = TensorDataset(torch.randn(256, 64), torch.randn(256, 1))
compression = TopKCompression(ratio=0.1)
trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[compression])
trainer.fit(Regression(), DataLoader(data, batch_size=16))
if trainer.global_rank == 0:
    print(json.dumps({"optimizer_steps": trainer.global_step, "hook_steps": compression.state.stats["steps"],
                      "base": type(compression).__mro__[1].__module__}), flush=True)
"""


def test_callback_works_where_only_pytorch_lightning_is_installed(tmp_path):
    script = tmp_path / "pl_only.py"
    script.write_text(PYTORCH_LIGHTNING_SCRIPT)
    summary = json_lines(sys.executable, script, cwd=tmp_path)[-1]
    assert summary["base"].startswith("pytorch_lightning")  # the callback subclasses the package the user has
    assert summary["hook_steps"] == summary["optimizer_steps"] == 8  # 128 samples per rank, batches of 16
