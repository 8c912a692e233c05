"""A run's checkpoint: what each file holds, writing one, restoring from one, and which one a rerun resumes.

One directory per report (Ray Train merges every rank's files into it)::

    model.pt       the model's state_dict                           (rank 0)
    optimizer.pt   optimizer, LR scheduler and GradScaler state     (rank 0)
    meta.json      epoch, steps, workers, the run's identity, every epoch's metrics (rank 0)
    rank{r}.pt     rank r's hook state (its residuals) and random state (every rank)

and, beside the run's checkpoints, Ray Train's snapshot (:data:`SNAPSHOT_FILE`),
which records a checkpoint only once every rank's files are in. The same
per-rank files serve hand-written Ray loops (:func:`raytopk.ray.save_state`).
Loading uses ``weights_only=True``.
"""

import io
import json
import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from raytopk.config import ConfigError, run_identity
from raytopk.hook import TopKState, load_rank_state
from raytopk.storage import exists, join, read_bytes, read_text

__all__ = [
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "META_FILE",
    "SNAPSHOT_FILE",
    "rank_file",
    "save_rank",
    "load_rank",
    "save",
    "meta",
    "restore",
    "latest",
    "recorded",
]

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's finished checkpoints


def rank_file(rank: int) -> str:
    """The checkpoint file holding one rank's hook state (its residuals) and what else :func:`save_state` was given."""
    return f"rank{rank}.pt"


def save_rank(state: Optional[TopKState], directory: str, **extra) -> None:
    """Write this rank's hook state (None without the hook) and ``extra`` (anything ``torch.save`` takes) to
    ``directory``/``rank{r}.pt``.

    Every rank calls it on its own copy of the checkpoint directory; Ray Train merges them.
    """
    torch.save(
        {"hook": state.state_dict() if state is not None else None, **extra},
        os.path.join(directory, rank_file(dist.get_rank())),
    )


def load_rank(state: Optional[TopKState], directory: str, map_location="cpu") -> dict:
    """Load into ``state`` what :func:`save_rank` wrote for this rank; return its ``extra``.

    From a checkpoint of another worker count, the hook state is the saved
    ranks' mean and ``extra`` is saved rank ``rank % saved_count``'s; the returned
    dict then also holds ``resized_from`` and ``residual_mean_error`` (see
    :func:`raytopk.hook.load_rank_state`). Every rank must call it.
    """
    world_size = dist.get_world_size()
    saved_count = sum(1 for name in os.listdir(directory) if re.fullmatch(r"rank\d+\.pt", name))
    if saved_count == 0:
        raise FileNotFoundError(f"{directory} holds no {rank_file(0)}: not a checkpoint raytopk wrote")

    def load(rank):
        return torch.load(os.path.join(directory, rank_file(rank)), map_location=map_location, weights_only=True)

    extra = load(dist.get_rank() % saved_count)
    hook = extra.pop("hook")
    if state is None or hook is None:
        return {**extra, **({"resized_from": saved_count} if saved_count != world_size else {})}
    if saved_count == world_size:
        state.load_state_dict(hook)
        return extra
    return {**extra, **load_rank_state(state, [load(r)["hook"] for r in range(saved_count)])}


def save(
    directory: str, rank: int, state: Optional[TopKState], model: torch.nn.Module, training: dict, meta: dict
) -> None:
    """Write this rank's part of a checkpoint: its hook state and random state; on rank 0 also the model,
    ``training`` (``{"optimizer", "scheduler", "scaler"}``: their state_dicts) and ``meta`` (:func:`meta`)."""
    save_rank(state, directory, rng=torch.get_rng_state())
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(directory, MODEL_FILE))
        torch.save(training, os.path.join(directory, OPTIMIZER_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f)


def meta(cfg, epoch: int, steps: int, workers: int, history: list) -> dict:
    """What ``meta.json`` records: where the run stands, what it trains, and every epoch's metrics so far (checkpointed
    or not: the summary's history, whatever Ray keeps)."""
    return {
        "epoch": epoch,
        "steps": steps,
        "workers": workers,
        "identity": run_identity(cfg),
        "metrics": history[-1],
        "history": history,
    }


def restore(directory: str, state: Optional[TopKState], model, optimizer, scheduler, scaler, device) -> tuple:
    """Load a checkpoint written by :func:`save`; return ``(epoch, step, history, resize)`` to continue from.

    A checkpoint saved by another number of workers is redistributed by
    :func:`load_rank`: every worker starts from the mean of the saved
    residuals and from a saved rank's random state, and ``resize`` says from how
    many workers, and how far the mean the workers now hold is from the saved one.
    """
    with open(os.path.join(directory, META_FILE)) as f:
        saved_meta = json.load(f)
    model.load_state_dict(torch.load(os.path.join(directory, MODEL_FILE), map_location=device, weights_only=True))
    training = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=device, weights_only=True)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    if training.get("scaler"):
        scaler.load_state_dict(training["scaler"])
    resize = load_rank(state, directory)
    torch.set_rng_state(resize.pop("rng"))
    return saved_meta["epoch"], saved_meta["steps"], saved_meta.get("history", [saved_meta["metrics"]]), resize


def latest(run_dir: str, cfg):
    """``(path, meta)`` of the checkpoint Ray Train will resume the run from, or None; a ConfigError if it cannot be.

    Ray copies a checkpoint's files into ``run_dir`` one by one, and only when
    every rank's copy has finished does it record the checkpoint in the run's
    snapshot (:data:`SNAPSHOT_FILE`); a rerun resumes from the latest one
    recorded there. So a crash during a copy leaves a directory that is never
    read, and the previous checkpoint stays the one to resume. The recorded
    one must train the same job (:func:`~raytopk.config.run_identity`) and
    every file must load, checked here before any worker starts.
    """
    found = recorded(run_dir)
    if found is None:
        return None
    path, found_meta = found
    try:
        names = sorted({MODEL_FILE, OPTIMIZER_FILE} | {rank_file(r) for r in range(found_meta["workers"])})
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"checkpoint {path}: unreadable {META_FILE} ({err!r}); allowed: --restart, or another name"
        ) from None
    ours, saved = run_identity(cfg), found_meta.get("identity", {})
    for key in sorted(set(ours) | set(saved)):
        if saved.get(key) != ours.get(key):
            raise ConfigError(
                f"{key}: got {ours.get(key)!r}, but run {cfg.name} was trained with {saved.get(key)!r}; "
                "allowed: the same value to resume it, --restart to train from scratch, or another name"
            )
    for name in names:
        try:
            torch.load(io.BytesIO(read_bytes(join(path, name))), map_location="cpu", weights_only=True)
        except Exception as err:  # missing, truncated or foreign: any read or unpickling error
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"checkpoint {join(path, name)}: cannot be loaded ({reason}); allowed: --restart, or another name"
            ) from None
    return path, found_meta


def recorded(run_dir: str):
    """``(path, meta)`` of the latest checkpoint in the run's snapshot, or None; a ConfigError if either cannot be
    read."""
    snapshot = join(run_dir, SNAPSHOT_FILE)
    if not exists(snapshot):
        return None
    try:
        latest = json.loads(read_text(snapshot))["latest_checkpoint_result"]
        if latest is None:
            return None
        path = join(run_dir, latest["checkpoint_dir_name"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{snapshot}: unreadable ({err!r}); allowed: --restart, or another name") from None
    try:
        return path, json.loads(read_text(join(path, META_FILE)))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {path}: unreadable {META_FILE} ({err!r}); allowed: --restart, or another name"
        ) from None
