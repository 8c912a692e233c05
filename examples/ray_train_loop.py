"""Your own Ray Train loop with raytopk: ``raytopk.ray.prepare_model`` instead of Ray's, per-rank checkpoints.

    python examples/ray_train_loop.py --workers 2 --epochs 3 --storage-path runs/ray_loop

SimpleCNN on mnist5k (no download), on a local Ray (or ``RAY_ADDRESS``). Every epoch
reports a checkpoint: rank 0 writes the model and optimizer, every rank its own
residual (``raytopk.ray.save_state``). Rerun the same command with more ``--epochs``
and Ray Train resumes the run (same ``--name`` and ``--storage-path``) from its latest
checkpoint, each rank from its own residual. Prints the last epoch's metrics as JSON.
"""

import argparse
import json
import os
import tempfile

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import raytopk.ray
from raytopk.data import load_dataset
from raytopk.models import build_model


def train_loop_per_worker(config: dict) -> None:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    train_set, test_set = load_dataset("mnist5k", "", download=False)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler, drop_last=True)

    model = raytopk.ray.prepare_model(
        build_model("simple_cnn"), ratio=config["ratio"]
    )  # DDP + hook, even for one worker
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start, steps = 0, 0
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as directory:
            model.module.load_state_dict(torch.load(os.path.join(directory, "model.pt"), weights_only=True))
            optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
            own = raytopk.ray.load_state(model, directory)  # this rank's residual, and what else it saved
            start, steps = own["epoch"], own["steps"]
            torch.set_rng_state(own["rng"])

    state = raytopk.ray.hook_state(model)
    for epoch in range(start, config["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
        model.eval()
        with torch.no_grad():
            x, y = zip(*(test_set[i] for i in range(rank, len(test_set), world_size)))
            correct = (model.module(torch.stack(x)).argmax(1) == torch.tensor(y)).sum()
        totals = torch.tensor(
            [float(correct), len(y), state.stats["bytes_sent"], state.stats["dense_bytes"]], dtype=torch.float64
        )
        dist.all_reduce(totals)
        metrics = {
            "epoch": epoch + 1,
            "test_accuracy": totals[0].item() / totals[1].item(),
            "bytes_sent": int(totals[2]),
            "dense_bytes": int(totals[3]),
            "hook_steps": state.stats["steps"],
            "optimizer_steps": steps,
        }
        with tempfile.TemporaryDirectory() as directory:
            raytopk.ray.save_state(model, directory, epoch=epoch + 1, steps=steps, rng=torch.get_rng_state())
            if rank == 0:
                torch.save(model.module.state_dict(), os.path.join(directory, "model.pt"))
                torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--name", default="ray_loop")
    parser.add_argument("--storage-path", default=os.path.abspath("runs"))
    args = parser.parse_args()

    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"epochs": args.epochs, "ratio": args.ratio},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
        run_config=ray.train.RunConfig(name=args.name, storage_path=os.path.abspath(args.storage_path)),
    )
    result = trainer.fit()
    print(json.dumps(result.metrics), flush=True)


if __name__ == "__main__":
    main()
