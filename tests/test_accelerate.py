"""raytopk.accelerate.attach on a real Accelerate run: 2 gloo processes (torchrun), 2 micro-batches per step."""

import accelerate  # noqa: F401  (the optional extra raytopk[accelerate]; the test extra installs it, CI runs this for real)
import pytest
import safetensors.torch
import torch

from scripts import example

pytestmark = pytest.mark.integrations


def _run(*args) -> dict:
    """``torchrun ... examples/accelerate_mnist.py ARGS`` as the README runs it: rank 0's summary line."""
    return example("accelerate_mnist.py", *args, torchrun=True)[-1]


def test_accelerate_attach_compresses_once_per_step_and_save_state_resumes_every_rank_exactly(tmp_path):
    """2 micro-batches per step; 2 epochs, then --resume to 3, end as 3 straight, bit for bit."""
    straight = _run("--epochs", "3", "--accumulate", "2", "--checkpoint-dir", str(tmp_path / "straight"))
    assert straight["test_accuracy"] >= 0.90, straight
    assert straight["hook_steps"] == straight["optimizer_steps"] > 0  # once per step, not per micro-batch
    two = _run("--epochs", "2", "--accumulate", "2", "--checkpoint-dir", str(tmp_path / "resumed"))
    # The third epoch (long after the two dense warm-up steps): at most 3% of dense DDP's bytes at ratio 0.01.
    assert straight["bytes_sent"] - two["bytes_sent"] <= 0.03 * (straight["dense_bytes"] - two["dense_bytes"])
    resumed = _run("--epochs", "3", "--accumulate", "2", "--checkpoint-dir", str(tmp_path / "resumed"), "--resume")
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "custom_checkpoint_0.pkl", weights_only=False)["ranks"]
    b = torch.load(tmp_path / "resumed" / "custom_checkpoint_0.pkl", weights_only=False)["ranks"]
    assert len(a) == 2  # every rank's hook state, in the main process's file
    for rank in range(2):
        for name, residual in a[rank]["residuals"].items():
            assert torch.equal(residual, b[rank]["residuals"][name]), (rank, name)
    x, y = (safetensors.torch.load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    for name, weight in x.items():
        assert torch.equal(weight, y[name]), name


def test_accelerate_attach_without_ddp_warns_and_does_nothing():
    from accelerate import Accelerator

    import raytopk.accelerate

    accelerator = Accelerator(cpu=True)  # one process: prepare returns the bare model
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="not DistributedDataParallel"):
        assert raytopk.accelerate.attach(accelerator, model, ratio=0.01) is None
