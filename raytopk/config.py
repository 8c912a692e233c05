"""One training config: a dataclass loaded from YAML, overridden by CLI flags, validated.

Every key of :class:`TrainConfig` may appear in a job YAML (``jobs/*.yaml``);
unknown keys, wrong types and out-of-range values are :class:`ConfigError`
with a one-line message naming the key, the bad value and what is allowed.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

from raytopk.options import JOB_FORMS, CompressionOptions, ConfigError, check_fields, type_ok

__all__ = [
    "ConfigError",
    "DGC_OFF",
    "PARQUET",
    "TrainConfig",
    "load_config",
    "check_fields",
    "check_sizes",
    "check_name",
    "check_compression_used",
    "from_mapping",
    "run_identity",
    "default_run_name",
]


PARQUET = "parquet"  # the dataset name of one's own Parquet files


def _job_keys(options) -> type:
    """The fields of ``options`` (a dataclass) as job keys: the same names, defaults, checks and help, but
    settable; those with a job form of their own (:data:`~raytopk.options.JOB_FORMS`) left out."""
    keys = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in fields(options)
        if f.name not in JOB_FORMS
    ]
    return dataclasses.make_dataclass("CompressionKeys", keys)


@dataclass
class TrainConfig(_job_keys(CompressionOptions)):
    """What to train, how to compress, where to run and save. Field docs are the YAML keys.

    How to compress: every :class:`~raytopk.options.CompressionOptions` field is
    a key of its own (``ratio``, ``exchange``, ...), defined there; the two with a
    job form are ``momentum_correction`` and ``warmup_epochs`` below.
    """

    # What to train.
    model: str = "simple_cnn"
    dataset: str = "mnist5k"
    data_dir: str = "~/.cache/raytopk/data"
    download: bool = False
    # Your own data (dataset: parquet; raytopk.parquet reads it through Ray Data).
    data_path: Optional[str] = None  # Parquet files: a directory, a file, or a URI (s3://, gs://)
    test_path: Optional[str] = None  # the test split's files; else data_path's test/ directory; else ...
    test_fraction: float = 0.1  # ... this share of data_path's rows, by a seeded hash of each row
    image_column: str = "image"  # PNG or JPEG bytes, or lists of C*H*W numbers
    label_column: str = "label"  # integer classes 0, 1, 2, ...
    image_shape: Optional[list] = None  # [C, H, W] of images stored as lists of numbers
    shuffle_seed: Optional[int] = None  # seeded shuffling in Ray Data: the same batches on a rerun
    epochs: int = 3
    batch_size: int = 64  # per worker
    max_train_batches: int = 0  # per epoch and worker; 0 means the whole shard
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0
    # How to compress (and the CompressionOptions keys).
    compress: bool = False
    # topk | dense | fp16 (PyTorch's fp16_compress_hook); sets compress; unset: compress decides
    method: Optional[str] = None
    warmup_epochs: int = 0  # the sparsity warm-up's length (warmup_ratio), in epochs
    momentum_correction: bool = False  # SGD's momentum moves into the hook; the optimizer runs without
    # DDP's buckets; unset: 25 MB each with the hook (raytopk.ray.prepare_model), else DDP's defaults
    bucket_cap_mb: Optional[float] = None
    # Precision and batching.
    amp: str = "none"  # torch.autocast: bf16 (CPU or GPU) or fp16 (GPU, with a GradScaler)
    accumulate: int = 1  # micro-batches per optimizer step (DDP no_sync between)
    # Where to run.
    workers: int = 2  # per-worker batch_size and lr are for this many workers
    min_workers: int = 0  # elastic: train with anywhere from this many to ``workers``; 0: always ``workers``
    resize_interval_s: float = 60.0  # elastic: how often Ray Train looks for room to grow the group
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: Optional[dict] = None  # custom resources per worker, e.g. {fake_gpu: 1}
    backend: str = "auto"
    address: Optional[str] = None
    # Where to save.
    name: Optional[str] = None  # the run's name under checkpoint_dir; a new one per run unless set
    checkpoint_dir: str = "~/raytopk_runs"
    save_every: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 2
    tensorboard: bool = False
    output: Optional[str] = None

    def __post_init__(self):
        check_fields(self, _CHOICES, _INTERVALS)
        from raytopk.data import DATASETS
        from raytopk.models import MODELS

        for key, known in (("model", MODELS), ("dataset", [*DATASETS, PARQUET])):
            if getattr(self, key) not in known:
                raise ConfigError(f"{key}: got {getattr(self, key)!r}; allowed: {', '.join(sorted(known))}")
        check_name("name", self.name)
        if self.method is not None:  # the comparison methods by name: top-k is compress, the others are not
            self.compress = self.method == "topk"
        _check_combinations(self)
        self.compression(steps_per_epoch=1)  # the options' own checks of their combinations
        _check_own_data(self)
        if self.dataset != PARQUET:  # a Parquet dataset's size is read from its files (raytopk.parquet.inspect)
            check_sizes(
                self,
                DATASETS[self.dataset].train_size,
                f"{self.dataset} has {DATASETS[self.dataset].train_size} training images",
            )
        if self.save_every > self.epochs:
            raise ConfigError(
                f"save_every: got {self.save_every}, more than epochs {self.epochs}; allowed: 1 to {self.epochs}"
            )

    def compression(self, steps_per_epoch: int) -> CompressionOptions:
        """The hook's options: the option keys, momentum correction's momentum, warm-up epochs as steps."""
        keys = {f.name: getattr(self, f.name) for f in fields(CompressionOptions) if f.name not in JOB_FORMS}
        momentum = self.momentum if self.momentum_correction else 0.0
        return CompressionOptions(**keys, momentum=momentum, warmup_steps=self.warmup_epochs * steps_per_epoch)

    @property
    def method_name(self) -> str:
        """What the workers exchange: ``method``, or when unset what ``compress`` says (``topk`` or ``dense``)."""
        return self.method or ("topk" if self.compress else "dense")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_name(key: str, value: Optional[str]) -> None:
    """A run or sweep name becomes a directory under shared storage: no separators, no ``..``, no leading dot."""
    if value is not None and (not _NAME.fullmatch(value) or ".." in value):
        raise ConfigError(
            f"{key}: got {value!r}; allowed: up to 200 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'"
        )


def check_sizes(cfg: "TrainConfig", train_size: int, what: str) -> None:
    """Sizes that would train nothing, against the dataset's training split (``what`` says how large it is).

    Each of ``W`` workers gets ``ceil(n / W)`` images (``DistributedSampler`` pads the
    shards to one size) and drops the last partial batch; an elastic run's shard is
    smallest at ``workers``, so that is the count checked. A ``max_train_batches``
    above an epoch's batches is allowed: it is a cap, and the same job file may run
    on more workers, whose shards are smaller.
    """
    if cfg.workers > train_size:
        raise ConfigError(f"workers: got {cfg.workers}, but {what}; allowed: at most {train_size}")
    shard = -(-train_size // cfg.workers)
    if cfg.batch_size > shard:
        raise ConfigError(
            f"batch_size: got {cfg.batch_size}, more than a worker's share ({what}, {shard} per worker "
            f"with {cfg.workers} workers), so no worker would train a step; allowed: at most {shard}"
        )
    batches = shard // cfg.batch_size
    if cfg.accumulate > batches:
        raise ConfigError(
            f"accumulate: got {cfg.accumulate}, more than the {batches} batches an epoch holds per worker "
            f"({shard} images, batch_size {cfg.batch_size}), so no step would be taken; allowed: at most {batches}"
        )


def _check_own_data(cfg: "TrainConfig") -> None:
    """The Parquet keys: ``data_path`` with ``dataset: parquet`` and only then; a test fraction that leaves both splits
    rows."""
    if cfg.dataset == PARQUET and not cfg.data_path:
        raise ConfigError(
            "data_path: not set, but dataset is 'parquet'; allowed: a directory, a file or a URI of Parquet files"
        )
    if cfg.dataset != PARQUET:
        for key in ("data_path", "test_path", "image_shape", "shuffle_seed"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key}: set, but dataset is {cfg.dataset!r}; allowed: only with dataset: parquet")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"test_fraction: got {cfg.test_fraction!r}; allowed: a number in (0, 1)")
    shape = cfg.image_shape
    if shape is not None and not (len(shape) == 3 and all(type_ok(n, int) and n > 0 for n in shape)):
        raise ConfigError(f"image_shape: got {shape!r}; allowed: [C, H, W], three positive integers")


# Deep Gradient Compression's keys, each as it is when off: only a top-k job may turn one on.
DGC_OFF = {
    "warmup_ratio": None,
    "warmup_epochs": 0,
    "momentum_correction": False,
    "clip_norm": None,
    "per_layer": False,
}


def _check_combinations(cfg: "TrainConfig") -> None:
    """Settings that are valid alone but wrong together."""
    on = [key for key, off in DGC_OFF.items() if getattr(cfg, key) != off]
    if not cfg.compress and on:
        raise ConfigError(f"{on[0]}: set, but compress is false; allowed: only with compress: true")
    if cfg.warmup_epochs and cfg.warmup_ratio is None:
        raise ConfigError(
            f"warmup_epochs: got {cfg.warmup_epochs}, but warmup_ratio is null; allowed: set warmup_ratio too"
        )
    if cfg.momentum_correction and cfg.optimizer != "sgd":
        raise ConfigError(
            f"momentum_correction: true with optimizer {cfg.optimizer!r}; allowed: only with optimizer: sgd"
        )
    if cfg.momentum_correction and not 0 < cfg.momentum < 1:
        raise ConfigError(f"momentum: got {cfg.momentum!r} with momentum_correction; allowed: a number in (0, 1)")
    if cfg.max_train_batches and cfg.accumulate > cfg.max_train_batches:
        raise ConfigError(
            f"accumulate: got {cfg.accumulate}, more than max_train_batches {cfg.max_train_batches}; "
            "allowed: at most max_train_batches"
        )
    if cfg.min_workers > cfg.workers:
        raise ConfigError(
            f"min_workers: got {cfg.min_workers}, more than workers {cfg.workers}; "
            "allowed: 0 (always workers) or 1 to workers"
        )
    for name, amount in (cfg.resources_per_worker or {}).items():
        if (
            name in ("CPU", "GPU")
            or not isinstance(name, str)
            or not type_ok(amount, float)
            or not 0 < amount < math.inf
        ):
            raise ConfigError(
                f"resources_per_worker: got {{{name!r}: {amount!r}}}; allowed: custom resource names (CPU and GPU "
                "come from cpus_per_worker and use_gpu) with numbers > 0"
            )
    if cfg.amp == "fp16" and not cfg.use_gpu:
        raise ConfigError("amp: got 'fp16' without use_gpu; allowed on CPU: none, bf16")
    if cfg.backend == "nccl" and not cfg.use_gpu:  # NCCL's process group refuses to start without GPUs
        raise ConfigError("backend: got 'nccl' without use_gpu; allowed on CPU: auto, gloo")


_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "lr_schedule": ("cosine", "constant"),
    "backend": ("auto", "gloo", "nccl"),
    "amp": ("none", "bf16", "fp16"),
    "method": ("topk", "dense", "fp16"),
}
_INTERVALS = {
    "epochs": "[1, inf)",
    "batch_size": "[1, inf)",
    "max_train_batches": "[0, inf)",
    "lr": "(0, inf)",
    "momentum": "[0, 1]",
    "weight_decay": "[0, inf)",
    "warmup_epochs": "[0, inf)",
    "accumulate": "[1, inf)",
    "bucket_cap_mb": "(0, inf)",
    "workers": "[1, inf)",
    "min_workers": "[0, inf)",
    "resize_interval_s": "(0, inf)",
    "cpus_per_worker": "[0, inf)",
    "save_every": "[1, inf)",
    "keep_checkpoints": "[1, inf)",
    "max_failures": "[0, inf)",
}


def from_mapping(cls, values: dict, source: str):
    """``cls(**values)`` after checking that every key is one of its fields; ``source`` names where they came from."""
    _check_keys(cls, values, source)
    return cls(**values)


def _check_keys(cls, keys, source: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")


def load_config(
    path: Optional[str] = None, sets: Optional[dict] = None, *, side_by_side: bool = False, **overrides
) -> TrainConfig:
    """A validated config: defaults, then the YAML file at ``path``, then ``sets`` (``--set`` pairs: a null there is
    a value, as in the YAML), then ``overrides`` (flags: None is a flag not given).

    ``side_by_side``: the job also runs compressed (``raytopk bench``), so its compression keys are used even where
    ``compress`` is false (see :func:`check_compression_used`)."""
    values = read_yaml_mapping(path) if path is not None else {}
    _check_keys(TrainConfig, values, path)
    _check_keys(TrainConfig, sets or {}, "--set")
    _check_keys(TrainConfig, overrides, "override")  # a flag, or a caller's keyword
    values.update(sets or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    if not side_by_side:
        check_compression_used(cfg, values)
    return cfg


# The keys only the hook reads (CompressionOptions' own; DGC's are refused by value in _check_combinations).
_COMPRESSION_KEYS = {f.name for f in fields(CompressionOptions) if f.name not in JOB_FORMS}


def check_compression_used(cfg: TrainConfig, given: dict) -> None:
    """Refuse a compression key (``ratio``, ``exchange``, ...) that was ``given`` (keys to their values, or their
    search space) for a job that does not compress: it would change nothing, and the run would silently be dense
    (``--ratio 0.001`` without ``--compress``). A job that turns compression off itself (``compress: false``, a
    ``method``) may keep them: the dense baseline of a top-k job."""
    if cfg.compress or {"compress", "method"} & given.keys():
        return
    unused = sorted(_COMPRESSION_KEYS & given.keys())
    if unused:
        raise ConfigError(
            f"{unused[0]}: got {given[unused[0]]!r}, but compress is false, so nothing uses it; "
            "allowed: with compress: true (--compress); to train dense on purpose, say compress: false (--no-compress)"
        )


def read_yaml_mapping(path: str) -> dict:
    """The YAML file at ``path`` as a dict, or a ConfigError saying what is wrong with it."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        values = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); allowed: a YAML file in UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; allowed: a mapping of job keys to values") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values, got {type(values).__name__}")
    return values


# Keys that say where and how long a run goes, not what it trains: a rerun may change them and still resume.
# How entries cross the network is among them: a residual is what was not used, whichever exchange ran
# (and auto's choice changes with the worker count anyway); so are DDP's buckets, whose residuals are kept per
# parameter.
_NOT_IDENTITY = {
    "exchange",
    "capacity_factor",
    "keep_factor",
    "link_gbps",
    "link_latency_us",
    "ranks_per_node",
    "bucket_cap_mb",
    "data_dir",
    "download",
    "epochs",
    "workers",
    "min_workers",
    "resize_interval_s",
    "use_gpu",
    "cpus_per_worker",
    "resources_per_worker",
    "backend",
    "address",
    "name",
    "checkpoint_dir",
    "save_every",
    "keep_checkpoints",
    "max_failures",
    "tensorboard",
    "output",
}


def run_identity(cfg: TrainConfig) -> dict:
    """What a run trains: every key a checkpoint must agree with before a rerun resumes from it."""
    identity = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in _NOT_IDENTITY}
    if identity.pop("method") == "fp16":  # topk and dense are what compress already records
        identity["method"] = "fp16"
    return identity


def default_run_name(cfg: TrainConfig) -> str:
    """``model-dataset-method-digest``: the same job gets the same name, so rerunning it resumes it."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:8]
    kind = f"topk{cfg.ratio:g}" if cfg.compress else cfg.method_name
    return f"{cfg.model}-{cfg.dataset}-{kind}-{digest}"


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with user paths made absolute (workers may run in another directory); URIs stay as they are."""
    from raytopk.storage import resolve

    return dataclasses.replace(
        cfg,
        data_dir=os.path.abspath(os.path.expanduser(cfg.data_dir)),
        checkpoint_dir=resolve(cfg.checkpoint_dir),
        data_path=cfg.data_path
        and resolve(cfg.data_path),  # also the run's identity: the same files from any directory
        test_path=cfg.test_path and resolve(cfg.test_path),
    )
