"""Every compression option, defined and checked once: :class:`CompressionOptions`.

Torch-free, so a job is checked before PyTorch loads. Each option is a field:
its name, its default, what it allows (``choices`` or an ``interval`` such as
``"(0, 1]"``) and one line of help. Everything that configures compression
reads them from here:

- :class:`~raytopk.TopKState` takes them as keywords (or a ``CompressionOptions``);
- the job config (:class:`~raytopk.config.TrainConfig`) has a key for each,
  and the command line a flag for each key, with the help below;
- the Lightning, Accelerate and Ray adapters pass their keywords on to ``TopKState``.

Two options have a job form of their own, because a job knows things a hook
does not: ``momentum`` (the job's ``momentum_correction: true`` moves the
optimizer's ``momentum`` into the hook) and ``warmup_steps`` (the job counts
``warmup_epochs``). :data:`JOB_FORMS` names them.

A bad value is a :class:`ConfigError` (a ``ValueError``) of one line: the
option, the value, and what is allowed.
"""

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Optional

from raytopk.cost_model import EXCHANGES, KEEP_FACTOR, Link

__all__ = [
    "CompressionOptions",
    "ConfigError",
    "JOB_FORMS",
    "VALUE_DTYPES",
    "check_fields",
    "option",
    "options_from",
    "type_ok",
]

# How values may travel, and the torch dtype each name stands for.
VALUE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Options a job sets through a key of its own (the job key's name).
JOB_FORMS = {"momentum": "momentum_correction", "warmup_steps": "warmup_epochs"}


class ConfigError(ValueError):
    """A bad option or job value; the message is meant for the user as it is."""


def option(default, help: str, *, choices=None, interval: Optional[str] = None):
    """A dataclass field with what it allows (``choices``, or ``interval`` like ``"[0, 1)"``) and its help."""
    return field(default=default, metadata={"help": help, "choices": choices, "interval": interval})


@dataclass(frozen=True)
class CompressionOptions:
    """What :func:`~raytopk.topk_hook` sends and how: see :class:`~raytopk.TopKState` for what each does."""

    ratio: float = option(0.01, "each worker's top share of a bucket's entries (DGC's ratio)", interval="(0, 1]")
    start_iter: int = option(2, "dense allreduce steps before compression starts", interval="[0, inf)")
    value_dtype: str = option("fp32", "how values travel", choices=tuple(VALUE_DTYPES))
    # Deep Gradient Compression's techniques, each off by default.
    warmup_ratio: Optional[float] = option(
        None, "sparsity warm-up: the ratio decays from this to ratio", interval="(0, 1]"
    )
    warmup_steps: int = option(0, "... over this many compressed steps", interval="[0, inf)")
    momentum: float = option(
        0.0, "momentum correction: the hook keeps the SGD velocity with this momentum; 0 is off", interval="[0, 1)"
    )
    clip_norm: Optional[float] = option(None, "local gradient clipping to this global norm", interval="(0, inf)")
    per_layer: bool = option(False, "top-k of each parameter; 1-D and small ones dense")
    dense_below: int = option(1024, "with per_layer: parameters with fewer entries go dense", interval="[0, inf)")
    # How the selected entries cross the network.
    exchange: str = option("auto", "how entries cross the network (auto: by the cost model)", choices=EXCHANGES)
    capacity_factor: float = option(
        1.25, "sharded: slots per destination, as a multiple of its selection over the workers", interval="[1, inf)"
    )
    keep_factor: float = option(
        KEEP_FACTOR,
        "sharded: sums each owner keeps, as a multiple of its selection over the workers",
        interval="[1, inf)",
    )
    link_gbps: float = option(1.0, "auto's cost model: bandwidth between nodes, Gbit/s", interval="(0, inf)")
    link_latency_us: float = option(50.0, "auto's cost model: latency per message between nodes", interval="[0, inf)")
    ranks_per_node: int = option(
        0, "the node layout; 0: LOCAL_WORLD_SIZE, as torchrun and Ray Train set it", interval="[0, inf)"
    )

    def __post_init__(self):
        check_fields(self)
        if self.warmup_steps and self.warmup_ratio is None:
            raise ConfigError(
                f"warmup_steps: got {self.warmup_steps}, but warmup_ratio is None; allowed: set warmup_ratio too"
            )
        if self.per_layer and self.exchange in ("sharded", "hierarchical"):
            raise ConfigError(
                f"exchange: got {self.exchange!r} with per_layer: true; allowed with per_layer: auto, allgather"
            )

    @property
    def link(self) -> Link:
        """The network between nodes that ``auto``'s cost model assumes (``link_gbps``, ``link_latency_us``)."""
        return Link(inter_gbps=self.link_gbps, inter_latency_us=self.link_latency_us)


def options_from(options: Optional[CompressionOptions] = None, **changes) -> CompressionOptions:
    """``options`` (or the defaults) with ``changes``; an unknown name is a ConfigError that lists the known ones."""
    known = {f.name for f in fields(CompressionOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a compression option; allowed: {', '.join(sorted(known))}")
    if options is not None and not isinstance(options, CompressionOptions):
        raise ConfigError(f"options: got {options!r}; allowed: a raytopk.CompressionOptions")
    return dataclasses.replace(options or CompressionOptions(), **changes)


def type_ok(value, kind) -> bool:
    """Whether ``value`` is of the field type ``kind`` (``Optional[X]``: None too); a bool is not a number."""
    if kind in (Optional[str], Optional[float], Optional[dict], Optional[list], Optional[int]):
        return value is None or type_ok(value, kind.__args__[0])
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", dict: "a mapping"}
    names[list] = "a list"
    if kind in names:
        return names[kind]
    return f"{names[kind.__args__[0]]} or null"


def _inside(value, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as ``"(0, 1]"`` or ``"[1, inf)"``."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return not math.isnan(value) and above and below


def check_fields(obj, choices: Optional[dict] = None, intervals: Optional[dict] = None) -> None:
    """Check a dataclass's field types, then what each allows: its field's ``choices`` and ``interval``
    (:func:`option`), or else those given here by field name."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not type_ok(value, f.type):
            raise ConfigError(f"{f.name}: got {value!r}; allowed: {_describe(f.type)}")
        allowed = f.metadata.get("choices") or (choices or {}).get(f.name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"{f.name}: got {value!r}; allowed: {', '.join(allowed)}")
        interval = f.metadata.get("interval") or (intervals or {}).get(f.name)
        if interval and value is not None and not _inside(value, interval):
            raise ConfigError(f"{f.name}: got {value!r}; allowed: a number in {interval}")
