"""Ray Train service: ``train_loop_per_worker`` and the driver that builds the TorchTrainer.

Each worker trains a DDP model on its shard; with ``compress`` it registers
:func:`raytopk.topk_hook`. After each epoch it evaluates on the whole test
split, reports metrics, and (every ``save_every`` epochs) a checkpoint that
holds the model, optimizer, scheduler, epoch and every rank's hook state and
random state, so a resumed run continues exactly where this one stopped.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import secrets
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from raytopk.config import PARQUET, ConfigError, TrainConfig, default_run_name, resolved, run_identity
from raytopk.console import Channel, Console, StepProgress, Watch, start_ray, worker_failures_line
from raytopk.cost_model import Layout, Link, dense_allreduce_bytes, dense_network_bytes
from raytopk.data import DATASETS, load_dataset
from raytopk.exchange import node_layout
from raytopk.hook import TopKState
from raytopk.models import build_model
from raytopk.optim import MomentumCorrectedSGD
from raytopk.preflight import check_paths, local_ray_cpus
from raytopk.ray import load_state, prepare_model, rank_file, save_state
from raytopk.storage import exists, is_uri, join, provenance, read_bytes, read_text, write_json

__all__ = ["train_loop_per_worker", "build_trainer", "run", "RunInterrupted", "bytes_line"]

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
# The driver writes a token here in a local run directory; every worker must read it back.
STORAGE_PROBE = ".storage_probe"
NOT_SHARED = "is not seen from the node of worker"  # in the error a worker raises when it cannot
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's finished checkpoints


def train_loop_per_worker(config: dict) -> None:
    """One worker's training: read top to bottom, it is the whole recipe."""
    import ray.train
    import ray.train.torch

    storage_token = config.pop("storage_token", None)
    parquet_shape = config.pop("parquet_shape", None)  # what the driver read of a Parquet dataset
    channel = config.pop("channel", None) or Channel()  # to the driver's console; printed here without one
    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    shape, train_batches, test_batches, epoch_batches = _data(cfg, rank, world_size, parquet_shape)
    model = build_model(cfg.model, shape["in_channels"], shape["num_classes"], shape["image_size"]).to(device)
    # The per-worker batch is fixed, so the global batch follows the worker count, and the learning
    # rate follows it linearly (Goyal et al.): ``lr`` is the rate for ``workers`` workers.
    base_lr = cfg.lr * world_size / cfg.workers
    optimizer = _optimizer(cfg, model, base_lr)
    schedule = _schedule(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    # Micro-batches per epoch: whole optimizer steps of ``accumulate`` micro-batches each.
    micro_batches = min(epoch_batches, cfg.max_train_batches or epoch_batches) // cfg.accumulate * cfg.accumulate
    state = _hook_state(cfg, model, optimizer, micro_batches // cfg.accumulate) if cfg.compress else None
    _check_storage_seen(cfg, storage_token, rank, channel)
    # A DDP model even for one worker, with the hook when compressing (what users' own Ray loops call too).
    ddp = prepare_model(
        model,
        ratio=None,
        state=state,
        parallel_strategy_kwargs={"bucket_cap_mb": cfg.bucket_cap_mb} if cfg.bucket_cap_mb else None,
    )
    if cfg.method == "fp16":  # the comparison PyTorch ships: every bucket allreduced as fp16
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        ddp.register_comm_hook(None, fp16_compress_hook)
    start_epoch, steps_done, history, resize = 0, 0, [], {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start_epoch, steps_done, history, resize = _restore(directory, ddp, optimizer, scheduler, scaler, device)
        # The schedule follows this run's epoch count (a finished run rerun with more epochs continues on
        # it) and this group's size (a checkpoint of another worker count saved another base rate).
        scheduler.base_lrs = [base_lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = base_lr, base_lr * schedule(start_epoch)

    # What DDP's ring allreduce sends per worker and step, in all and across node cards: the baseline every byte count
    # is compared with.
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    layout = node_layout(dist.group.WORLD, cfg.ranks_per_node or None)[0] if world_size > 1 else Layout(1)
    step_dense_bytes, step_dense_network = (
        dense_allreduce_bytes(grad_bytes, world_size),
        dense_network_bytes(grad_bytes, layout),
    )
    writer = _tensorboard(cfg, rank)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    progress = StepProgress(channel, rank, cfg.epochs, micro_batches, world_size * cfg.batch_size)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        ddp.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        optimizer.zero_grad(set_to_none=True)
        for x, y in train_batches(epoch):
            if batches == micro_batches:
                break
            x, y = x.to(device), y.to(device)
            batches += 1
            synchronize = batches % cfg.accumulate == 0  # the hook runs on this micro-batch's backward only
            with contextlib.nullcontext() if synchronize else ddp.no_sync():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = torch.nn.functional.cross_entropy(ddp(x), y)
                scaler.scale(loss / cfg.accumulate).backward()
            if synchronize:
                scaler.step(optimizer)  # skips the step when the gradients are not finite
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()  # no per-step device sync
            progress.step(
                epoch + 1,
                batches,
                started,
                loss,  # this worker's bytes so far, read only when it posts
                lambda: _bytes_so_far(cfg, state, (steps_done + batches // cfg.accumulate) * step_dense_bytes, 0.0)[0],
            )
        scheduler.step()
        steps_done += batches // cfg.accumulate
        seconds = time.perf_counter() - started
        # The plain module: each rank's test shard may hold a different number of
        # batches, and DDP's forward could start a collective the others never join.
        correct, total = _evaluate(model, test_batches(), device)

        # Bytes on the wire and across node cards, summed over workers: the hook's count, or dense DDP's
        # (the baseline; half of it in fp16).
        bytes_now = _bytes_so_far(cfg, state, steps_done * step_dense_bytes, steps_done * step_dense_network)
        sums = _all_reduce_sum([loss_sum.item(), batches, correct, total, *bytes_now], device)
        metrics = {
            "epoch": epoch + 1,
            "loss": sums[0] / max(sums[1], 1),
            "test_accuracy": sums[2] / sums[3],
            **_byte_metrics(*sums[4:8], layout.nodes),
            "hook_s": sums[8] / world_size,
            "samples_per_s": world_size * batches * cfg.batch_size / seconds,
            "train_s": seconds,  # this epoch's training steps, evaluation and checkpoint left out
            "workers": world_size,
            "lr": optimizer.param_groups[0]["lr"],
            # What auto chose (or the exchange set), this rank's buckets: e.g. "sharded" or "allgather+sharded".
            "exchange": "+".join(sorted(state.algorithms)) if state is not None and state.algorithms else "dense",
        }
        if epoch == start_epoch:
            metrics.update(
                resize
            )  # the first epoch after a resize says from what, and that the residuals' mean was kept
        history.append(metrics)
        if writer is not None:
            for key, value in metrics.items():
                if not isinstance(value, str):
                    writer.add_scalar(key, value, epoch + 1)
            writer.flush()
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            with tempfile.TemporaryDirectory() as directory:
                _save(
                    directory, rank, world_size, epoch + 1, steps_done, history, cfg, ddp, optimizer, scheduler, scaler
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()


def _data(cfg: TrainConfig, rank: int, world_size: int, parquet_shape: Optional[dict]):
    """``(shape, train batches for an epoch, this rank's test batches, batches per epoch)`` for the job's dataset.

    A built-in dataset is read here, each rank taking its ``DistributedSampler``
    shard; a Parquet dataset arrives through Ray Data as this rank's shard,
    decoded already (:mod:`raytopk.parquet`), and its batch count is the
    driver's count of rows (expected, for a ``test_fraction`` split: the loop
    stops where the shard does, every rank's shard being the same size).
    """
    if parquet_shape is not None:
        from raytopk import parquet

        batches = parquet_shape["train_rows"] // world_size // cfg.batch_size
        return parquet_shape, lambda epoch: parquet.shard_batches(cfg, epoch, rank), parquet.test_batches, batches
    spec = DATASETS[cfg.dataset]
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world_size)), batch_size=256)

    def train_batches(epoch):
        sampler.set_epoch(epoch)
        return train_loader

    shape = {"in_channels": spec.in_channels, "image_size": spec.image_size, "num_classes": spec.num_classes}
    return shape, train_batches, lambda: test_loader, len(train_loader)


def _check_storage_seen(cfg: TrainConfig, token, rank: int, channel: Channel) -> None:
    """Refuse a local ``checkpoint_dir`` that some worker's node does not see (one all-gather per start).

    Ray Train writes each rank's checkpoint files from the rank's own node
    and reads them back on any node, so every node must share the storage: a
    URI (``s3://``, ``gs://``), or a local path on one file system all nodes
    mount (NFS, or one machine, as with the local cluster's fake nodes).
    Workers on more than one node say so (to the driver's console) once per start when it holds.
    """
    import ray

    if token is None:  # a URI: the object store is the same from every node
        return
    probe = join(cfg.checkpoint_dir, cfg.name, STORAGE_PROBE)
    seen = os.path.isfile(probe) and read_text(probe) == token
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (ray.get_runtime_context().get_node_id(), seen))
    blind = [r for r, (_, ok) in enumerate(views) if not ok]
    if blind:
        raise RuntimeError(
            f"checkpoint_dir: {cfg.checkpoint_dir} {NOT_SHARED} rank {blind[0]}; allowed on a cluster of several "
            "nodes: a URI (s3://, gs://) or a path every node mounts (NFS)"
        )
    nodes = len({node_id for node_id, _ in views})
    if rank == 0 and nodes > 1:
        channel.post(
            "say",
            f"raytopk: checkpoint_dir {cfg.checkpoint_dir} is a local path that the workers' {nodes} nodes all "
            "see (one shared file system), so they may save there",
        )


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if cfg.momentum_correction:  # the hook applies the momentum to the gradient; the optimizer, to the weight decay
        return MomentumCorrectedSGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _hook_state(cfg: TrainConfig, model, optimizer, steps_per_epoch: int) -> TopKState:
    """The hook's state for ``cfg``: epochs of sparsity warm-up become optimizer steps."""
    state = TopKState(
        cfg.ratio,
        cfg.start_iter,
        value_dtype=cfg.value_dtype,
        module=model,
        warmup_ratio=cfg.warmup_ratio,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        momentum=cfg.momentum if cfg.momentum_correction else 0.0,
        clip_norm=cfg.clip_norm,
        per_layer=cfg.per_layer,
        dense_below=cfg.dense_below,
        exchange=cfg.exchange,
        capacity_factor=cfg.capacity_factor,
        keep_factor=cfg.keep_factor,
        link=Link(inter_gbps=cfg.link_gbps, inter_latency_us=cfg.link_latency_us),
        local_world_size=cfg.ranks_per_node or None,
    )
    state.check_optimizer(optimizer)
    return state


def _schedule(cfg: TrainConfig):
    """Learning-rate factor per epoch: cosine decay to zero over the run, or constant."""
    if cfg.lr_schedule == "constant":
        return lambda epoch: 1.0
    return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def _evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    return correct, total


def _bytes_so_far(cfg: TrainConfig, state: Optional[TopKState], dense_bytes: float, dense_network: float):
    """This rank's ``(bytes_sent, dense_bytes, network_bytes, dense_network_bytes, hook_s)`` so far."""
    if state is not None:
        return [
            state.stats[key] for key in ("bytes_sent", "dense_bytes", "network_bytes", "dense_network_bytes", "hook_s")
        ]
    share = 0.5 if cfg.method == "fp16" else 1.0
    return [share * dense_bytes, dense_bytes, share * dense_network, dense_network, 0.0]


def _byte_metrics(sent: float, dense: float, network: float, dense_network: float, nodes: int) -> dict:
    """Byte counts summed over ranks, and the reduction users see: across node cards with several nodes, else rank to
    rank."""
    wire_reduction = dense / sent if sent else 1.0  # one worker sends nothing either way
    return {
        "bytes_sent": int(sent),
        "dense_bytes": int(dense),
        "network_bytes": int(network),
        "dense_network_bytes": int(dense_network),
        "nodes": nodes,
        "wire_reduction": wire_reduction,
        "reduction": (dense_network / network if network else 1.0) if nodes > 1 else wire_reduction,
    }


def bytes_line(m: dict) -> str:
    """The bytes part of an epoch or result line (metrics or a summary): the wire, across node cards with several
    nodes."""
    workers = f"{m['workers']} worker{'s' if m['workers'] != 1 else ''}"
    wire = f"wire {m['bytes_sent'] / m['workers'] / 1e6:.2f} MB/worker ({m['exchange']}, {workers}"
    if m.get("nodes", 1) > 1:
        return (
            f"{wire} on {m['nodes']} nodes)  across nodes {m['network_bytes'] / 1e6:.2f} MB "
            f"(dense {m['dense_network_bytes'] / 1e6:.2f})  reduction {m['reduction']:.1f}x"
        )
    return f"{wire}, one node)  reduction {m['reduction']:.1f}x"


def _all_reduce_sum(values, device):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _tensorboard(cfg: TrainConfig, rank: int):
    if not cfg.tensorboard or rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=join(cfg.checkpoint_dir, cfg.name, "tensorboard"))


def _save(directory, rank, world_size, epoch, steps, history, cfg, ddp, optimizer, scheduler, scaler) -> None:
    """Write this rank's part of a checkpoint; Ray merges every rank's files into one directory."""
    save_state(ddp, directory, rng=torch.get_rng_state())  # this rank's residuals and random state
    if rank == 0:
        torch.save(ddp.module.state_dict(), os.path.join(directory, MODEL_FILE))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            os.path.join(directory, OPTIMIZER_FILE),
        )
        # Every epoch's metrics so far, checkpointed or not: the summary's history, whatever Ray keeps.
        meta = {
            "epoch": epoch,
            "steps": steps,
            "workers": world_size,
            "identity": run_identity(cfg),
            "metrics": history[-1],
            "history": history,
        }
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f)


def _restore(directory, ddp, optimizer, scheduler, scaler, device) -> tuple:
    """Load a checkpoint written by :func:`_save`; return ``(epoch, step, history, resize)`` to continue from.

    A checkpoint saved by another number of workers is redistributed by
    :func:`raytopk.ray.load_state`: every worker starts from the mean of the saved
    residuals and from a saved rank's random state, and ``resize`` says from how
    many workers, and how far the mean the workers now hold is from the saved one.
    """
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    ddp.module.load_state_dict(torch.load(os.path.join(directory, MODEL_FILE), map_location=device, weights_only=True))
    saved = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    resize = load_state(ddp, directory)
    torch.set_rng_state(resize.pop("rng"))
    return meta["epoch"], meta["steps"], meta.get("history", [meta["metrics"]]), resize


def _progress_callback(channel: Channel, epochs: int):
    from ray.train import UserCallback

    class EpochProgress(UserCallback):
        """Runs on Ray Train's controller: each epoch's line (after a resize, that first) and each worker failure, to
        the console."""

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            line = (
                f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}  test acc {100 * m['test_accuracy']:.2f}%  "
                f"{bytes_line(m)}"
                f"  {m['train_s']:.1f} s"
            )
            if "resized_from" in m:
                kept = (
                    f"; residuals redistributed, their mean kept (largest difference {m['residual_mean_error']:.2g})"
                    if "residual_mean_error" in m
                    else ""
                )
                line = (
                    f"resized: {m['resized_from']} -> {m['workers']} workers from the last checkpoint; "
                    f"lr {m['lr']:.4g}{kept}\n{line}"
                )
            channel.post("epoch", {"desc": f"epoch {m['epoch']}/{epochs}", "text": line}, wait=True)

        def after_exception(self, run_context, worker_exceptions):
            channel.post("failure", worker_failures_line(worker_exceptions), wait=True)

    return EpochProgress()


def build_trainer(cfg: TrainConfig, callbacks=None, channel: Optional[Channel] = None):
    """The TorchTrainer for ``cfg`` (paths resolved, a run name set); ``callbacks`` replace the epoch printer.

    ``channel`` (:class:`~raytopk.console.Channel`) takes the run's progress
    and lines to the driver's console; without one they are printed where they
    happen (Ray forwards them with ``log_to_driver``).

    With ``min_workers`` the group is elastic (Ray Train's ``(min, max)``
    form): it starts with as many workers as the cluster holds, restarts
    from the latest checkpoint with fewer when a node is lost, and grows
    again when nodes come back, looking every ``resize_interval_s``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    data = {}
    if cfg.dataset == PARQUET:  # read, decoded and split by Ray Data; the workers get the image shape and row count
        from raytopk import parquet

        spec = parquet.inspect(cfg)
        data = {"datasets": parquet.datasets(cfg, spec), "dataset_config": parquet.data_config(cfg)}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **dataclasses.asdict(cfg),
            "storage_token": _write_storage_probe(cfg),
            "channel": channel,
            **({"parquet_shape": spec.model_shape} if data else {}),
        },
        **data,
        torch_config=TorchConfig(backend=None if cfg.backend == "auto" else cfg.backend, timeout_s=300),
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.workers) if cfg.min_workers else cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=cfg.resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.checkpoint_dir,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[_progress_callback(channel or Channel(), cfg.epochs)] if callbacks is None else callbacks,
        ),
    )


def worker_resources(cfg: TrainConfig) -> dict:
    """What one worker asks Ray for: its CPUs, a GPU with ``use_gpu``, and any custom resources."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}), **(cfg.resources_per_worker or {})}


def _write_storage_probe(cfg: TrainConfig):
    """For a local ``checkpoint_dir``: a fresh token in the run directory, for :func:`_check_storage_seen`; None for a
    URI."""
    if is_uri(cfg.checkpoint_dir):
        return None
    token = secrets.token_hex(16)
    os.makedirs(join(cfg.checkpoint_dir, cfg.name), exist_ok=True)
    with open(join(cfg.checkpoint_dir, cfg.name, STORAGE_PROBE), "w") as f:
        f.write(token)
    return token


def run(cfg: TrainConfig, restart: bool = False, command: Optional[str] = None, verbose: bool = False) -> dict:
    """Train ``cfg`` on Ray (``cfg.address``, else ``RAY_ADDRESS``, else a local Ray); return the summary.

    The run is named ``cfg.name``, else after what it trains
    (:func:`~raytopk.config.default_run_name`), so running the same job again
    resumes it from its latest checkpoint, and a finished one returns its
    summary without training. ``restart`` starts a new run beside the old one.
    ``command``, the command line that asked for the run, is recorded in the summary.
    It prints what runs, a progress bar (plain lines off a terminal) and a line per
    epoch; Ray's own output only when ``verbose`` (when this call starts Ray).
    """
    import ray
    from ray.train import TrainingFailedError

    cfg = resolved(cfg)
    check_paths(cfg)
    name = cfg.name or default_run_name(cfg)
    cfg = dataclasses.replace(cfg, name=f"{name}-restart-{time.strftime('%Y%m%d-%H%M%S')}" if restart else name)
    previous = latest_checkpoint(join(cfg.checkpoint_dir, cfg.name), cfg)
    if previous is not None:
        path, meta = previous
        if meta["epoch"] >= cfg.epochs:
            print(
                f"raytopk: {cfg.name} already finished {meta['epoch']} epochs; raise epochs to continue it, "
                "or --restart to train it again",
                flush=True,
            )
            return _finish(cfg, _summary(cfg, meta, path, wall_s=0.0, command=command))
        print(f"raytopk: resuming {cfg.name} after epoch {meta['epoch']} from {path}", flush=True)
    _check_local(cfg)
    console = Console()
    console.say(_what_runs(cfg))
    started = time.time()
    try:
        if not ray.is_initialized():
            start_ray(cfg.address, verbose, num_cpus=local_ray_cpus(cfg))
        _say_if_waiting(cfg)
        channel = Channel.open()
        try:
            with Watch(channel, console, waiting="starting Ray Train's workers"):
                build_trainer(cfg, channel=channel).fit()
        finally:
            channel.close()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl+C: before the run, Python's KeyboardInterrupt; during it, Ray Train's own handler
        # aborts the run and Ray's ray.get raises SystemExit. Either way the run stopped here.
        ray.shutdown()  # the local Ray this command started goes with it; a cluster stays
        raise RunInterrupted(cfg.name, _recorded_checkpoint(join(cfg.checkpoint_dir, cfg.name))) from None
    except TrainingFailedError as err:
        shared = next((line for line in str(err).splitlines() if NOT_SHARED in line), None)
        if shared:  # the same on every retry: say it once, as the user error it is
            ray.shutdown()
            raise ConfigError(shared[shared.index("checkpoint_dir:") :]) from None
        raise
    path, meta = _recorded_checkpoint(join(cfg.checkpoint_dir, cfg.name))
    return _finish(cfg, _summary(cfg, meta, path, time.time() - started, command))


def _what_runs(cfg: TrainConfig) -> str:
    """The line a run starts with: model, data, workers, what they exchange, where checkpoints go."""
    workers = f"{cfg.min_workers}-{cfg.workers}" if cfg.min_workers else str(cfg.workers)
    method = f"top-k {cfg.ratio:g} (exchange {cfg.exchange})" if cfg.compress else cfg.method_name
    return (
        f"raytopk: training {cfg.model} on {cfg.dataset}, {workers} worker{'s' * (workers != '1')}, {method}; "
        f"checkpoints in {join(cfg.checkpoint_dir, cfg.name)}"
    )


class RunInterrupted(Exception):
    """Ctrl+C stopped run ``name``; ``recorded`` is ``(path, meta)`` of its last complete checkpoint, or None."""

    def __init__(self, name: str, recorded):
        super().__init__(name)
        self.name, self.recorded = name, recorded


def _finish(cfg: TrainConfig, summary: dict) -> dict:
    """Write the summary to ``--output`` (whole or not at all) on every path that returns one."""
    if cfg.output:
        write_json(cfg.output, summary)
    return summary


def _summary(cfg: TrainConfig, meta: dict, checkpoint, wall_s: float, command: Optional[str]) -> dict:
    """The run's summary from its last checkpoint's ``meta``: the final metrics and every epoch's."""
    m = meta["metrics"]
    return {
        "name": cfg.name,
        **provenance(command),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "compress": cfg.compress,
        "method": cfg.method_name,
        "ratio": cfg.ratio if cfg.compress else 1.0,
        "workers": m.get("workers", cfg.workers),  # the last epoch's; history says each epoch's
        "epochs": m["epoch"],
        "test_accuracy": m["test_accuracy"],
        "loss": m["loss"],
        "bytes_sent": m["bytes_sent"],
        "dense_bytes": m["dense_bytes"],
        # Across node cards, summed over ranks (absent from checkpoints older than the count: None).
        "network_bytes": m.get("network_bytes"),
        "dense_network_bytes": m.get("dense_network_bytes"),
        "nodes": m.get("nodes", 1),
        "wire_mb_per_worker": m["bytes_sent"] / m.get("workers", cfg.workers) / 1e6,
        "exchange": m.get("exchange"),
        "reduction": m["reduction"],
        "hook_s": m["hook_s"],
        "wall_s": wall_s,
        "run_dir": join(cfg.checkpoint_dir, cfg.name),
        "checkpoint": checkpoint,
        "history": meta.get("history", [m]),
    }


def latest_checkpoint(run_dir: str, cfg: TrainConfig):
    """``(path, meta)`` of the checkpoint Ray Train will resume the run from, or None; a ConfigError if it cannot be.

    Ray copies a checkpoint's files into ``run_dir`` one by one, and only when
    every rank's copy has finished does it record the checkpoint in the run's
    snapshot (:data:`SNAPSHOT_FILE`); a rerun resumes from the latest one
    recorded there. So a crash during a copy leaves a directory that is never
    read, and the previous checkpoint stays the one to resume. The recorded
    one must train the same job (:func:`~raytopk.config.run_identity`) and
    every file must load, checked here before any worker starts.
    """
    recorded = _recorded_checkpoint(run_dir)
    if recorded is None:
        return None
    path, meta = recorded
    try:
        names = sorted({MODEL_FILE, OPTIMIZER_FILE} | {rank_file(r) for r in range(meta["workers"])})
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"checkpoint {path}: unreadable {META_FILE} ({err!r}); allowed: --restart, or another name"
        ) from None
    ours, saved = run_identity(cfg), meta.get("identity", {})
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
    return path, meta


def _recorded_checkpoint(run_dir: str):
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


def _check_local(cfg: TrainConfig) -> None:
    """On a local Ray (no address: nothing scales up, the data is here), refuse what can never run.

    Too many workers would wait for resources forever, and a missing dataset
    would fail on every worker and retry; both are one-line errors instead,
    before Ray starts.
    """
    import ray

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return
    if not cfg.download and cfg.dataset != PARQUET:  # Parquet files were checked by check_paths
        load_dataset(cfg.dataset, cfg.data_dir, False)  # a DatasetError says where it looked and what to do
    if ray.is_initialized():
        have = ray.cluster_resources()
    else:  # what ray.init() will find on this machine
        have = {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}
    key = "min_workers" if cfg.min_workers else "workers"
    short = _shortfall(cfg, have)
    if short:
        resource, need, got, each = short
        fits = int(got // each)
        allowed = (
            f"at most {fits} {key} at {each:g} {resource} each"
            if fits
            else f"a cluster whose nodes offer {resource} (--address)"
        )
        raise ConfigError(
            f"{key}: got {getattr(cfg, key)}, which need {need:g} {resource} in all, but this local Ray has {got:g}; "
            f"allowed: {allowed}"
        )


def _say_if_waiting(cfg: TrainConfig) -> None:
    """On a cluster, workers beyond what it holds now wait for nodes (an autoscaler's, or ``ray start`` elsewhere): say
    so."""
    import ray

    short = _shortfall(cfg, ray.cluster_resources())
    if short:
        resource, need, got, _ = short
        count = cfg.min_workers or cfg.workers
        print(
            f"raytopk: waiting for nodes: {count} worker{'s' * (count != 1)} need{'s' * (count == 1)} {need:g} "
            f"{resource} in all and this cluster has {got:g} now; "
            "an autoscaler adds nodes for them (ray job stop, or Ctrl+C, ends the wait)",
            flush=True,
        )


def _shortfall(cfg: TrainConfig, have: dict):
    """``(resource, needed, available, per worker)`` for the first resource the workers need more of than ``have``, or
    None.

    An elastic run needs room for ``min_workers`` to start; a fixed one for ``workers``.
    """
    for resource, each in worker_resources(cfg).items():
        need, got = (cfg.min_workers or cfg.workers) * each, have.get(resource, 0)
        if need > got + 1e-9:
            return resource, need, got, each
    return None
