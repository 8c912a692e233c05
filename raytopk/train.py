"""Ray Train service: ``train_loop_per_worker`` and the driver that builds the TorchTrainer.

Each worker trains a DDP model on its shard; with ``compress`` it registers
:func:`raytopk.topk_hook`. After each epoch it evaluates on the whole test
split, reports metrics, and (every ``save_every`` epochs) a checkpoint that
holds the model, optimizer, scheduler, epoch and every rank's hook state and
random state, so a resumed run continues exactly where this one stopped.
"""

import contextlib
import dataclasses
import json
import math
import os
import posixpath
import secrets
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from raytopk.checkpoint import latest, recorded, restore, save
from raytopk.checkpoint import meta as checkpoint_meta
from raytopk.config import PARQUET, ConfigError, TrainConfig, default_run_name, resolved
from raytopk.console import Channel, Console, StepProgress, Watch, start_ray, worker_failures_line
from raytopk.cost_model import Layout, dense_allreduce_bytes, dense_network_bytes
from raytopk.data import DATASETS, load_dataset
from raytopk.exchange import node_layout
from raytopk.hook import TopKState
from raytopk.models import build_model
from raytopk.optim import MomentumCorrectedSGD
from raytopk.preflight import check_local, check_paths, local_ray_cpus, say_if_waiting, worker_resources
from raytopk.ray import prepare_model
from raytopk.storage import is_uri, join, provenance, read_text, write_json

__all__ = ["train_loop_per_worker", "build_trainer", "run", "RunInterrupted", "bytes_line"]

# The driver writes a token here in a local run directory; every worker must read it back.
STORAGE_PROBE = ".storage_probe"
# The summary of the run's last finish, in its directory: a rerun of the finished run returns it.
SUMMARY_FILE = "summary.json"
NOT_SHARED = "is not seen from the node of worker"  # in the error a worker raises when it cannot


def train_loop_per_worker(config: dict) -> None:
    """One worker's training: set up, then each epoch train, measure, and report (with a checkpoint when due)."""
    w = _setup(config)
    for epoch in range(w.start_epoch, w.cfg.epochs):
        started = time.perf_counter()
        loss_sum, batches = _train_epoch(w, epoch, started)
        lr = w.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at, before the schedule moves on
        w.scheduler.step()
        w.steps_done += batches // w.cfg.accumulate
        metrics = _epoch_metrics(w, epoch, loss_sum, batches, time.perf_counter() - started, lr)
        _report(w, epoch, metrics)
    if w.writer is not None:
        w.writer.close()


@dataclasses.dataclass
class _Worker:
    """What one worker's loop carries from epoch to epoch."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # the plain module (evaluated without DDP) ...
    ddp: torch.nn.Module  # ... and its DDP wrapper (trained), with the hook when compressing
    state: Optional[TopKState]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_batches: object  # epoch -> iterable of (x, y)
    test_batches: object  # () -> iterable of this rank's test share
    micro_batches: int  # per epoch: whole optimizer steps of ``accumulate`` micro-batches each
    nodes: int
    step_dense_bytes: float  # what DDP's ring allreduce sends per step, in all and across node cards: the baselines
    step_dense_network: float
    progress: StepProgress
    writer: object  # TensorBoard's SummaryWriter on rank 0 with ``tensorboard``, else None
    start_epoch: int = 0
    steps_done: int = 0
    history: list = dataclasses.field(default_factory=list)
    resize: dict = dataclasses.field(default_factory=dict)


def _setup(config: dict) -> _Worker:
    """Data, model, optimizer, the DDP model with the hook, and where a checkpoint says the run stands."""
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    micro_batches = min(epoch_batches, cfg.max_train_batches or epoch_batches) // cfg.accumulate * cfg.accumulate
    state = _hook_state(cfg, model, optimizer, micro_batches // cfg.accumulate) if cfg.compress else None
    _check_storage_seen(cfg, storage_token, rank, channel)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    layout = node_layout(dist.group.WORLD, cfg.ranks_per_node or None)[0] if world_size > 1 else Layout(1)
    w = _Worker(
        cfg=cfg, rank=rank, world_size=world_size, device=device, model=model, ddp=_ddp(cfg, model, state), state=state,
        optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        train_batches=train_batches, test_batches=test_batches, micro_batches=micro_batches, nodes=layout.nodes,
        step_dense_bytes=dense_allreduce_bytes(grad_bytes, world_size),
        step_dense_network=dense_network_bytes(grad_bytes, layout),
        progress=StepProgress(channel, rank, cfg.epochs, micro_batches, world_size * cfg.batch_size),
        writer=_tensorboard(cfg, rank),
    )  # fmt: skip
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            w.start_epoch, w.steps_done, w.history, w.resize = restore(
                directory, state, model, optimizer, scheduler, w.scaler, device
            )
        # The schedule follows this run's epoch count (a finished run rerun with more epochs continues on
        # it) and this group's size (a checkpoint of another worker count saved another base rate).
        scheduler.base_lrs = [base_lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = base_lr, base_lr * _schedule(cfg)(w.start_epoch)
    return w


def _ddp(cfg: TrainConfig, model: torch.nn.Module, state: Optional[TopKState]) -> torch.nn.Module:
    """A DDP model even for one worker, with the hook when compressing (what users' own Ray loops call too)."""
    ddp = prepare_model(
        model,
        ratio=None,
        state=state,
        parallel_strategy_kwargs={"bucket_cap_mb": cfg.bucket_cap_mb} if cfg.bucket_cap_mb else None,
    )
    if cfg.method == "fp16":  # the comparison PyTorch ships: every bucket allreduced as fp16
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        ddp.register_comm_hook(None, fp16_compress_hook)
    return ddp


def _train_epoch(w: _Worker, epoch: int, started: float):
    """One epoch's steps; ``(summed loss as a tensor, micro-batches run)``. The hook runs on each step's last
    micro-batch."""
    cfg, device = w.cfg, w.device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    w.ddp.train()
    loss_sum, batches = torch.zeros((), device=device), 0
    w.optimizer.zero_grad(set_to_none=True)
    for x, y in w.train_batches(epoch):
        if batches == w.micro_batches:
            break
        x, y = x.to(device), y.to(device)
        batches += 1
        synchronize = batches % cfg.accumulate == 0  # the hook runs on this micro-batch's backward only
        with contextlib.nullcontext() if synchronize else w.ddp.no_sync():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = torch.nn.functional.cross_entropy(w.ddp(x), y)
            w.scaler.scale(loss / cfg.accumulate).backward()
        if synchronize:
            w.scaler.step(w.optimizer)  # skips the step when the gradients are not finite
            w.scaler.update()
            w.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()  # no per-step device sync
        steps = w.steps_done + batches // cfg.accumulate
        # this worker's bytes so far, read only when the progress posts
        w.progress.step(epoch + 1, batches, started, loss, lambda: _bytes_so_far(w, steps, 0)[0])
    return loss_sum, batches


def _epoch_metrics(w: _Worker, epoch: int, loss_sum, batches: int, seconds: float, lr: float) -> dict:
    """The epoch's metrics, summed over workers: loss, test accuracy, bytes (the hook's or dense DDP's), speed, and
    the learning rate it trained at."""
    # The plain module: each rank's test shard may hold a different number of
    # batches, and DDP's forward could start a collective the others never join.
    correct, total = _evaluate(w.model, w.test_batches(), w.device)
    bytes_now = _bytes_so_far(w, w.steps_done, w.steps_done)
    sums = _all_reduce_sum([loss_sum.item(), batches, correct, total, *bytes_now], w.device)
    metrics = {
        "epoch": epoch + 1,
        "loss": sums[0] / max(sums[1], 1),
        "test_accuracy": sums[2] / sums[3],
        **_byte_metrics(*sums[4:8], w.nodes),
        "hook_s": sums[8] / w.world_size,
        "samples_per_s": w.world_size * batches * w.cfg.batch_size / seconds,
        "train_s": seconds,  # this epoch's training steps, evaluation and checkpoint left out
        "workers": w.world_size,
        "lr": lr,
        # What auto chose (or the exchange set), this rank's buckets: e.g. "sharded" or "allgather+sharded".
        "exchange": "+".join(sorted(w.state.algorithms)) if w.state is not None and w.state.algorithms else "dense",
    }
    if epoch == w.start_epoch:  # the first epoch after a resize says from what, and that the residuals' mean was kept
        metrics.update(w.resize)
    return metrics


def _report(w: _Worker, epoch: int, metrics: dict) -> None:
    """Record the epoch (history, TensorBoard) and report it to Ray Train, with a checkpoint every ``save_every``."""
    import ray.train

    w.history.append(metrics)
    if w.writer is not None:
        for key, value in metrics.items():
            if not isinstance(value, str):
                w.writer.add_scalar(key, value, epoch + 1)
        w.writer.flush()
    if (epoch + 1) % w.cfg.save_every and epoch + 1 != w.cfg.epochs:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        training = {name: getattr(w, name).state_dict() for name in ("optimizer", "scheduler", "scaler")}
        meta = checkpoint_meta(w.cfg, epoch + 1, w.steps_done, w.world_size, w.history)
        save(directory, w.rank, w.state, w.model, training, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


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
    state = TopKState(cfg.compression(steps_per_epoch), module=model)
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


def _bytes_so_far(w: _Worker, steps: int, network_steps: int):
    """This rank's ``(bytes_sent, dense_bytes, network_bytes, dense_network_bytes, hook_s)`` after ``steps`` steps:
    the hook's count, or dense DDP's (the baseline; half of it in fp16) with ``network_steps`` steps across node cards.
    """
    if w.state is not None:
        keys = ("bytes_sent", "dense_bytes", "network_bytes", "dense_network_bytes", "hook_s")
        return [w.state.stats[key] for key in keys]
    dense, dense_network = steps * w.step_dense_bytes, network_steps * w.step_dense_network
    share = 0.5 if w.cfg.method == "fp16" else 1.0
    return [share * dense, dense, share * dense_network, dense_network, 0.0]


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
    previous = latest(join(cfg.checkpoint_dir, cfg.name), cfg)
    if previous is not None:
        path, meta = previous
        if meta["epoch"] >= cfg.epochs:
            print(
                f"raytopk: {cfg.name} already finished {meta['epoch']} epochs; raise epochs to continue it, "
                "or --restart to train it again",
                flush=True,
            )
            return _finish(cfg, _finished_summary(cfg, meta, path, command))
        print(f"raytopk: resuming {cfg.name} after epoch {meta['epoch']} from {path}", flush=True)
    check_local(cfg)
    console = Console()
    console.say(_what_runs(cfg))
    started = time.time()
    try:
        if not ray.is_initialized():
            start_ray(cfg.address, verbose, num_cpus=local_ray_cpus(cfg))
        say_if_waiting(cfg)
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
        raise RunInterrupted(cfg.name, recorded(join(cfg.checkpoint_dir, cfg.name))) from None
    except TrainingFailedError as err:
        shared = next((line for line in str(err).splitlines() if NOT_SHARED in line), None)
        if shared:  # the same on every retry: say it once, as the user error it is
            ray.shutdown()
            raise ConfigError(shared[shared.index("checkpoint_dir:") :]) from None
        raise
    path, meta = recorded(join(cfg.checkpoint_dir, cfg.name))
    summary = _summary(cfg, meta, path, time.time() - started, command)
    write_json(join(cfg.checkpoint_dir, cfg.name, SUMMARY_FILE), summary)
    return _finish(cfg, summary)


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


def _finished_summary(cfg: TrainConfig, meta: dict, checkpoint, command: Optional[str]) -> dict:
    """A finished run's summary, as the command that finished it wrote it (its wall time included; its paths where
    the run is now); where that file is gone or is of an older checkpoint, one made from the checkpoint, whose wall
    time is unknown (None)."""
    run_dir = join(cfg.checkpoint_dir, cfg.name)
    try:
        stored = json.loads(read_text(join(run_dir, SUMMARY_FILE)))
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and posixpath.basename(str(stored.get("checkpoint"))) == posixpath.basename(checkpoint):
        return {**stored, "run_dir": run_dir, "checkpoint": checkpoint}
    return _summary(cfg, meta, checkpoint, wall_s=None, command=command)


def _summary(cfg: TrainConfig, meta: dict, checkpoint, wall_s: Optional[float], command: Optional[str]) -> dict:
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
