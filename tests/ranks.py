"""Run a function on several real processes joined in a gloo process group."""

import os
import tempfile
import traceback
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, store_path, fn, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(rank, world_size, *args), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size, *args, timeout=240, dying=(), env=None):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` new processes.

    Returns the per-rank return values (a list indexed by rank; None for the
    ranks in ``dying``, which end their process without returning); re-raises
    the first rank's failure with its traceback. ``fn`` must be importable (module level).
    ``env``: variables the ranks start with, for what is read at import (such as ``TRITON_INTERPRET``); each rank
    then starts a new interpreter instead of forking from one that imported torch already.
    """
    if env is None:
        ctx = mp.get_context("forkserver")  # a fresh process per rank, forked from a server that imported torch once
        ctx.set_forkserver_preload(["torch", "torch.distributed", "raytopk"])
    else:
        ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, env or {}):
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, os.path.join(tmp, "store"), fn, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            out = [results.get(timeout=timeout) for _ in range(world_size - len(dying))]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [(rank, tb) for rank, _, tb in out if tb]
    if errors:
        raise AssertionError(f"rank {errors[0][0]} failed:\n{errors[0][1]}")
    returned = {rank: value for rank, value, _ in out}
    return [returned.get(rank) for rank in range(world_size)]
