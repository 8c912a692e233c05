"""What the driver checks before Ray starts: the paths a run will write or read, and the resources its workers need.

The config's values are checked where they are parsed (:mod:`raytopk.config`);
paths can only be checked where they will be used, so ``raytopk train`` and ``bench``
call :func:`check_paths`, and ``tune`` :func:`check_directory` on its storage path,
on the machine that starts the run.
Each failure is one :class:`~raytopk.config.ConfigError` line naming the key, the
path and what is allowed. Whether a place can be written is tried, not
inferred from permission bits (root passes those, and a read-only or virtual
filesystem does not show in them): an empty directory made and removed at once.

Resources (:func:`check_local`, :func:`say_if_waiting`): on a local Ray, workers
that could never get their CPUs or GPUs are refused in one line; on a cluster the
run says it waits for nodes. What a worker asks for is :func:`worker_resources`.
"""

import os
import socket
import tempfile
from typing import Optional

from raytopk.config import PARQUET, ConfigError
from raytopk.data import DATASETS, load_dataset
from raytopk.storage import is_uri, resolve

__all__ = [
    "check_paths",
    "check_directory",
    "check_file",
    "local_ray_cpus",
    "check_local",
    "check_ray_address",
    "say_if_waiting",
    "worker_resources",
]


def check_paths(cfg) -> None:
    """The storage directory, the ``--output`` file and the data of a :class:`~raytopk.config.TrainConfig`.

    Parquet data is checked from its footers and first row group
    (:func:`raytopk.parquet.inspect`): paths, columns, labels, image shape, sizes.
    """
    check_directory("checkpoint_dir", cfg.checkpoint_dir)
    if cfg.output:
        check_file("output", cfg.output)
    if cfg.dataset == PARQUET:
        from raytopk.parquet import inspect

        inspect(cfg)
    elif DATASETS[cfg.dataset].reads_data_dir:
        check_directory("data_dir", cfg.data_dir, written=cfg.download)


def check_directory(key: str, path: str, written: bool = True) -> None:
    """``path`` is a directory, or (when ``written``) one can be created there; a URI's filesystem must be known."""
    if is_uri(path):
        _check_uri(key, path, want_directory=True)
        return
    full = resolve(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise ConfigError(
                f"{key}: got {path!r}, which is a file; allowed: a directory, or a path where one can be created"
            )
        if written and not _can_write_in(full):
            raise ConfigError(
                f"{key}: got {path!r}, a directory this user cannot write in; allowed: a writable directory"
            )
    elif written:
        _check_creatable(key, path, full)


def check_file(key: str, path: str) -> None:
    """``path`` can be written as a file: not a directory, and its directory exists writable or can be created."""
    if is_uri(path):
        _check_uri(key, path, want_directory=False)
        return
    full = resolve(path)
    if os.path.isdir(full):
        raise ConfigError(f"{key}: got {path!r}, which is a directory; allowed: a file path")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise ConfigError(f"{key}: got {path!r}, a file this user cannot write; allowed: a writable file path")
    parent = os.path.dirname(full)
    if os.path.isdir(parent):
        if not _can_write_in(parent):
            raise ConfigError(
                f"{key}: got {path!r}, in a directory this user cannot write in; allowed: a writable directory"
            )
    else:
        _check_creatable(key, path, parent)


def _check_creatable(key: str, path: str, full: str) -> None:
    """The nearest existing ancestor of ``full`` is a directory this user may create entries in."""
    ancestor = _nearest_existing(full)
    if ancestor is None or not os.path.isdir(ancestor):
        raise ConfigError(f"{key}: got {path!r}, but {ancestor or full!r} is a file; allowed: a path under a directory")
    if not _can_write_in(ancestor):
        raise ConfigError(
            f"{key}: got {path!r}, but this user cannot create anything in {ancestor}; allowed: a writable place"
        )


def _can_write_in(directory: str) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".raytopk-preflight-"))
    except OSError:
        return False
    return True


def _nearest_existing(full: str) -> Optional[str]:
    while not os.path.exists(full):
        parent = os.path.dirname(full)
        if parent == full:
            return None
        full = parent
    return full


def _check_uri(key: str, uri: str, want_directory: bool) -> None:
    """The URI's filesystem is one pyarrow knows; a ``file://`` one is also checked for its kind.

    A remote store (``s3://``, ``gs://``) is not contacted: a pre-flight check must
    not hang on a network timeout, and Ray reports a denied bucket itself.
    """
    import pyarrow
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, ValueError) as err:
        raise ConfigError(
            f"{key}: got {uri!r} ({str(err).splitlines()[0]}); allowed: a local path, or a URI pyarrow "
            "can open (s3://, gs://, file://, ...)"
        ) from None
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return
    kind = fs.get_file_info(inner).type
    if want_directory and kind == pyarrow.fs.FileType.File:
        raise ConfigError(f"{key}: got {uri!r}, which is a file; allowed: a directory")
    if not want_directory and kind == pyarrow.fs.FileType.Directory:
        raise ConfigError(f"{key}: got {uri!r}, which is a directory; allowed: a file path")


def local_ray_cpus(cfg, address: Optional[str] = None) -> Optional[int]:
    """The CPUs a local Ray started for ``cfg`` offers: one more than the machine's for Parquet data, else Ray's count.

    Ray Data's read and decode tasks need a CPU of their own, and workers
    holding every CPU of the machine would leave them waiting forever; the
    extra one shares the cores with the workers (what a DataLoader's worker
    processes would do). A cluster (``address``, the job's or the
    command's) offers what its nodes have.
    """
    if cfg.dataset != PARQUET or address or cfg.address or os.environ.get("RAY_ADDRESS"):
        return None
    return len(os.sched_getaffinity(0)) + 1


def check_ray_address(address: Optional[str]) -> None:
    """Refuse in one line a Ray address ``HOST:PORT`` or ``ray://HOST:PORT`` (``address``, else ``RAY_ADDRESS``)
    where nothing answers, which ``ray.init`` would keep trying for minutes. Other forms (``auto``, none) go to
    ``ray.init`` as they are."""
    key, address = ("address", address) if address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or "/" in host or not port.isdigit():  # auto, none, or another scheme (http:// is the jobs API's)
        return
    allowed = "allowed: HOST:PORT of a running Ray head (ray start --head prints it), ray://HOST:PORT, or auto"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"{key}: got {address!r}, where nothing answers ({err.strerror or err}); {allowed}") from None


def worker_resources(cfg) -> dict:
    """What one worker asks Ray for: its CPUs, a GPU with ``use_gpu``, and any custom resources."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}), **(cfg.resources_per_worker or {})}


def check_local(cfg) -> None:
    """On a local Ray (no address: nothing scales up, the data is here), refuse what can never run.

    Too many workers would wait for resources forever, and a missing dataset
    (or a failed download) would fail on every worker and retry; both are
    one-line errors instead, before Ray starts.
    """
    import ray
    import torch

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return
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
    if cfg.dataset != PARQUET:  # Parquet files were checked by check_paths
        # A DatasetError says where it looked and what to do. With download, the local workers read this machine's
        # directory: it is fetched here once, and a failed download is that one line too.
        load_dataset(cfg.dataset, cfg.data_dir, cfg.download)


def say_if_waiting(cfg) -> None:
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


def _shortfall(cfg, have: dict):
    """``(resource, needed, available, per worker)`` for the first resource the workers need more of than ``have``, or
    None.

    An elastic run needs room for ``min_workers`` to start; a fixed one for ``workers``.
    """
    for resource, each in worker_resources(cfg).items():
        need, got = (cfg.min_workers or cfg.workers) * each, have.get(resource, 0)
        if need > got + 1e-9:
            return resource, need, got, each
    return None
