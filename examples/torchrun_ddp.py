"""Plain PyTorch DDP with raytopk's hook: no Ray, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_ddp.py --epochs 3

Where there are GPUs, each process takes the one of its ``LOCAL_RANK`` and
the group is NCCL; elsewhere it is gloo on the CPU.

The hook is registered as PyTorch's PowerSGD hook is, with a ``TopKState`` that
needs no ``module``. With ``--checkpoint DIR`` every epoch saves the model and
optimizer (rank 0) and each rank's hook state (``rank{N}.pt``: its own residual),
and a rerun resumes from there. Rank 0 prints one JSON line per epoch.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import raytopk
from raytopk.data import load_dataset
from raytopk.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--checkpoint", help="directory to save each epoch in, and to resume from")
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, LOCAL_RANK and LOCAL_WORLD_SIZE
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    train_set, test_set = load_dataset("mnist5k", "", download=False)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler, drop_last=True)

    model = build_model("simple_cnn").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = raytopk.TopKState(ratio=args.ratio)
    ddp.register_comm_hook(state, raytopk.topk_hook)

    start, optimizer_steps = 0, 0
    if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, "meta.json")):
        with open(os.path.join(args.checkpoint, "meta.json")) as f:
            meta = json.load(f)
        start, optimizer_steps = meta["epoch"], meta["steps"]
        model.load_state_dict(
            torch.load(os.path.join(args.checkpoint, "model.pt"), map_location=device, weights_only=True)
        )
        optimizer.load_state_dict(
            torch.load(os.path.join(args.checkpoint, "optimizer.pt"), map_location=device, weights_only=True)
        )
        own = torch.load(os.path.join(args.checkpoint, f"rank{rank}.pt"), map_location=device, weights_only=True)
        state.load_state_dict(own["hook"])  # this rank's residual, exactly as it was saved
        torch.set_rng_state(own["rng"].cpu())

    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer_steps += 1
        model.eval()
        with torch.no_grad():
            x, y = zip(*(test_set[i] for i in range(rank, len(test_set), world_size)))
            correct = (model(torch.stack(x).to(device)).argmax(1) == torch.tensor(y, device=device)).sum()
        totals = torch.tensor(
            [float(correct), len(y), state.stats["bytes_sent"], state.stats["dense_bytes"]],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(totals)
        if args.checkpoint:
            save(args.checkpoint, rank, epoch + 1, optimizer_steps, model, optimizer, state)
        if rank == 0:
            print(
                json.dumps(
                    {
                        "epoch": epoch + 1,
                        "test_accuracy": totals[0].item() / totals[1].item(),
                        "bytes_sent": int(totals[2]),
                        "dense_bytes": int(totals[3]),
                        "hook_steps": state.stats["steps"],
                        "optimizer_steps": optimizer_steps,
                    }
                ),
                flush=True,
            )
    dist.destroy_process_group()


def save(directory, rank, epoch, steps, model, optimizer, state) -> None:
    """Each rank writes its hook state and random state; then rank 0 the model, optimizer and epoch (meta.json,
    last)."""
    os.makedirs(directory, exist_ok=True)
    torch.save({"hook": state.state_dict(), "rng": torch.get_rng_state()}, os.path.join(directory, f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
        torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump({"epoch": epoch, "steps": steps}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
