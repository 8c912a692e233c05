"""Hugging Face Accelerate with raytopk: ``raytopk.accelerate.attach`` on the prepared model, with gradient
accumulation.

    torchrun --standalone --nproc_per_node 2 examples/accelerate_mnist.py --epochs 3 --checkpoint-dir runs/accelerate

SimpleCNN on mnist5k (no download), on CPU (gloo). ``accelerator.save_state`` writes
each epoch to ``--checkpoint-dir``, every rank's residual included; ``--resume``
continues from there. Rank 0 prints one JSON line at the end.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

import raytopk.accelerate
from raytopk.data import load_dataset
from raytopk.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default="runs/accelerate")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    args = parser.parse_args()

    # A seedable sampler: each epoch's order follows the seed and the epoch, so a resumed run sees the same batches.
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=args.accumulate,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(0)
    train_set, test_set = load_dataset("mnist5k", "", download=False)
    model = build_model("simple_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = raytopk.accelerate.attach(accelerator, model, ratio=0.01)

    start, steps = 0, 0
    if args.resume:
        accelerator.load_state(args.checkpoint_dir)
        with open(os.path.join(args.checkpoint_dir, "progress.json")) as f:
            progress = json.load(f)
        start, steps = progress["epoch"], progress["steps"]
    for epoch in range(start, args.epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            steps += accelerator.sync_gradients  # an optimizer step that took effect
        accelerator.save_state(args.checkpoint_dir)
        if accelerator.is_main_process:
            with open(os.path.join(args.checkpoint_dir, "progress.json"), "w") as f:
                json.dump({"epoch": epoch + 1, "steps": steps}, f)

    model.eval()
    with torch.no_grad():
        x, y = zip(*(test_set[i] for i in range(accelerator.process_index, len(test_set), accelerator.num_processes)))
        correct = (model(torch.stack(x)).argmax(1) == torch.tensor(y)).sum()
    totals = accelerator.reduce(
        torch.tensor(
            [float(correct), len(y), state.stats["bytes_sent"], state.stats["dense_bytes"]], dtype=torch.float64
        ),
        reduction="sum",
    )
    if accelerator.is_main_process:
        print(
            json.dumps(
                {
                    "epochs": args.epochs,
                    "test_accuracy": totals[0].item() / totals[1].item(),
                    "bytes_sent": int(totals[2]),
                    "dense_bytes": int(totals[3]),
                    "hook_steps": state.stats["steps"],
                    "optimizer_steps": steps,
                }
            ),
            flush=True,
        )
    accelerator.wait_for_everyone()  # no rank tears its process group down while another still uses it
    accelerator.end_training()  # ends the process group too


if __name__ == "__main__":
    main()
