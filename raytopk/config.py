"""One training config: a dataclass loaded from YAML, overridden by CLI flags, validated.

Every key of :class:`TrainConfig` may appear in a job YAML (``jobs/*.yaml``);
unknown keys, wrong types and out-of-range values are :class:`ConfigError`
with a one-line message naming the key, the bad value and what is allowed.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["ConfigError", "TrainConfig", "load_config", "check_fields", "from_mapping"]


class ConfigError(ValueError):
    """A bad config value; the message is meant for the user as it is."""


@dataclass
class TrainConfig:
    """What to train, how to compress, where to run and save. Field docs are the YAML keys."""

    # What to train.
    model: str = "simple_cnn"
    dataset: str = "mnist5k"
    data_dir: str = "~/.cache/raytopk/data"
    download: bool = False
    epochs: int = 3
    batch_size: int = 64  # per worker
    max_train_batches: int = 0  # per epoch and worker; 0 means the whole shard
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0
    # How to compress.
    compress: bool = False
    ratio: float = 0.01
    start_iter: int = 2
    value_dtype: str = "fp32"
    # Where to run.
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
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
        check_fields(self, _CHOICES, _RANGES)
        from raytopk.data import DATASETS
        from raytopk.models import MODELS

        for key, known in (("model", MODELS), ("dataset", DATASETS)):
            if getattr(self, key) not in known:
                raise ConfigError(f"{key}: got {getattr(self, key)!r}; allowed: {', '.join(sorted(known))}")


_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "lr_schedule": ("cosine", "constant"),
    "value_dtype": ("fp32", "fp16", "bf16"),
    "backend": ("auto", "gloo", "nccl"),
}
# key -> (lowest allowed, whether the lowest is excluded, highest or None)
_RANGES = {
    "epochs": (1, False, None),
    "batch_size": (1, False, None),
    "max_train_batches": (0, False, None),
    "lr": (0, True, None),
    "momentum": (0, False, 1),
    "weight_decay": (0, False, None),
    "ratio": (0, True, 1),
    "start_iter": (0, False, None),
    "workers": (1, False, None),
    "cpus_per_worker": (0, False, None),
    "save_every": (1, False, None),
    "keep_checkpoints": (1, False, None),
    "max_failures": (0, False, None),
}


def _type_ok(value, kind) -> bool:
    if kind == Optional[str]:
        return value is None or isinstance(value, str)
    if kind == Optional[float]:
        return value is None or _type_ok(value, float)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", dict: "a mapping"}
    return names.get(kind, "a number or null" if kind == Optional[float] else "a string or null")


def check_fields(obj, choices: dict, ranges: dict) -> None:
    """Check a config dataclass's field types, then ``choices`` (key -> allowed) and ``ranges``."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, f.type):
            raise ConfigError(f"{f.name}: got {value!r}; allowed: {_describe(f.type)}")
        if f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"{f.name}: got {value!r}; allowed: {', '.join(choices[f.name])}")
        if f.name in ranges and value is not None:
            low, open_low, high = ranges[f.name]
            too_low = value <= low if open_low else value < low
            if math.isnan(value) or too_low or (high is not None and value > high):
                bracket = "(" if open_low else "["
                top = f"{high}]" if high is not None else "inf)"
                raise ConfigError(f"{f.name}: got {value!r}; allowed: a number in {bracket}{low}, {top}")


def from_mapping(cls, values: dict, source: str):
    """``cls(**values)`` after checking that every key is one of its fields; ``source`` names where they came from."""
    _check_keys(cls, values, source)
    return cls(**values)


def _check_keys(cls, keys, source: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")


def load_config(path: Optional[str] = None, **overrides) -> TrainConfig:
    """A validated config: defaults, then the YAML file at ``path``, then ``overrides`` (not None)."""
    values = read_yaml_mapping(path) if path is not None else {}
    _check_keys(TrainConfig, values, path)
    _check_keys(TrainConfig, overrides, "override")  # --set, or a caller's keyword
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def read_yaml_mapping(path: str) -> dict:
    """The YAML file at ``path`` as a dict, or a ConfigError saying what is wrong with it."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values, got {type(values).__name__}")
    return values


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with user paths made absolute (workers may run in another directory); URIs stay as they are."""
    from raytopk.storage import resolve

    return dataclasses.replace(
        cfg,
        data_dir=os.path.abspath(os.path.expanduser(cfg.data_dir)),
        checkpoint_dir=resolve(cfg.checkpoint_dir),
    )
