"""PyTorch Lightning with raytopk: the ``TopKCompression`` callback on a 2-process CPU DDP Trainer.

    python examples/lightning_mnist.py --epochs 3 --checkpoint-dir runs/lightning

SimpleCNN on mnist5k (no download). Lightning saves ``last.ckpt`` each epoch in
``--checkpoint-dir``, with every rank's residual in it; ``--resume`` continues from there.
Rank 0 prints one JSON line at the end.
"""

import argparse
import json
import os

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from raytopk.data import load_dataset
from raytopk.lightning import TopKCompression
from raytopk.models import build_model


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = build_model("simple_cnn")

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("test_accuracy", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default="runs/lightning")
    parser.add_argument("--resume", action="store_true", help="continue from last.ckpt in --checkpoint-dir")
    args = parser.parse_args()

    L.seed_everything(0)
    train_set, test_set = load_dataset("mnist5k", "", download=False)
    compression = TopKCompression(ratio=0.01)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=args.epochs,
        logger=False,
        callbacks=[compression, ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        Classifier(),
        DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True),
        DataLoader(test_set, batch_size=250),
        ckpt_path=os.path.join(args.checkpoint_dir, "last.ckpt") if args.resume else None,
    )
    if trainer.global_rank == 0:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        print(
            json.dumps(
                {
                    "epochs": trainer.current_epoch,
                    "optimizer_steps": trainer.global_step,
                    "hook_steps": compression.state.stats["steps"],
                    **metrics,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
