"""The hook's fused CPU loops (``kernels.c``), compiled on first use and loaded with ctypes.

On a CPU, each PyTorch call costs a few microseconds however small its tensor,
and each elementwise call is one more pass over memory. For a bucket the hook
needs about a dozen of both: add the residual, zero the bucket, filter by a
threshold, sample, decode every peer, check what arrived. :mod:`kernels.c`
does the passes in one and each decoding step in one call, with the same float32
arithmetic, so results are bit-identical to the PyTorch path.

The C file is compiled once per machine with the system's C compiler
(``$CC``, else ``cc``; a fraction of a second) into
``$XDG_CACHE_HOME/raytopk/kernels`` (default ``~/.cache/raytopk/kernels``;
a directory under the system's temporary one where that is not writable),
keyed by the source and the machine, as PyTorch's JIT extensions and
DeepSpeed's ops are. A lock file there makes the workers of one node build it
once: the first builds, the others wait and load its result. A CPU
:class:`~raytopk.hook.TopKState` builds it when it is created, so no backward
pass waits for a compiler. Where no compiler is found, or with
``RAYTOPK_KERNELS=0``, :func:`library` returns ``None`` (with one warning when
a build failed) and callers take the PyTorch path: slower, never different.
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from raytopk.devices import on_host

__all__ = [
    "library",
    "usable",
    "accumulate",
    "accumulate_topk",
    "topk_sampled",
    "scatter_add_rows",
    "clear_at",
    "finite_at",
]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off"]
_MAX_NUMEL = 2**31 - 1
_P = ctypes.c_void_p
_SIGNATURES = {
    "accumulate": (None, [_P, _P, _P, ctypes.c_int64]),
    "accumulate_topk": (
        ctypes.c_int64,
        [
            _P,
            _P,
            _P,
            ctypes.c_int64,
            _P,
            _P,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            _P,
            _P,
            ctypes.c_int64,
            _P,
            _P,
        ],
    ),
    "topk_sampled": (
        ctypes.c_int64,
        [
            _P,
            ctypes.c_int64,
            _P,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            _P,
            _P,
            ctypes.c_int64,
            _P,
            _P,
        ],
    ),
    "scatter_add_rows": (None, [_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, _P]),
    "clear_at": (None, [_P, _P, ctypes.c_int64]),
    "finite_at": (ctypes.c_int, [_P, _P, ctypes.c_int64]),
}


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built if this machine has none yet; ``None`` if off or unbuildable."""
    if os.environ.get("RAYTOPK_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(_build())
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"raytopk: could not build its C kernels ({error}); the hook runs its slower PyTorch path. "
            f"They need a C compiler (cc, or the one CC names) and a writable cache ({_cache_dir()}, "
            f"else {_fallback_dir()}); "
            "RAYTOPK_KERNELS=0 silences this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def _build() -> str:
    """Compile ``kernels.c`` into the cache unless it is there; the shared library's path."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(
        b"\0".join(
            [source, compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode(), sys.platform.encode()]
        )
    ).hexdigest()[:16]
    name = f"kernels-{key}.so"
    for cache in (_cache_dir(), _fallback_dir()):
        if os.path.exists(os.path.join(cache, name)):
            return os.path.join(cache, name)
    return _build_into(_cache_dir() if _writable(_cache_dir()) else _fallback_dir(), name, compiler)


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _build_into(cache: str, name: str, compiler: str) -> str:
    """Build ``name`` in ``cache``, once per machine: under a lock, the first builds and the others find its file."""
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, name)
    with open(os.path.join(cache, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        # Written under another name and renamed, so no process ever loads half a file.
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            built = subprocess.run(
                [*shlex.split(compiler), *FLAGS, "-o", scratch, SOURCE], capture_output=True, text=True, timeout=120
            )
            if built.returncode != 0:
                raise OSError(f"{compiler} exited with {built.returncode}: {built.stderr.strip()[-300:]}")
            os.replace(scratch, path)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
    return path


def _cache_dir() -> str:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/raytopk/kernels``, default ``~/.cache/raytopk/kernels``."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raytopk", "kernels")


def _fallback_dir() -> str:
    """Where kernels are built when the cache is not writable: this user's directory under the temporary one."""
    return os.path.join(tempfile.gettempdir(), f"raytopk-{os.getuid()}", "kernels")


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: every one contiguous float32 or int32 on the CPU, with
    fewer than 2**31 entries (the kernels' positions are int32), and the kernels built (never tried for others)."""
    return (
        on_host(*tensors)
        and all(t.dtype in (torch.float32, torch.int32) and t.is_contiguous() for t in tensors)
        and all(t.numel() <= _MAX_NUMEL for t in tensors)
        and library() is not None
    )


def accumulate(grad: torch.Tensor, residual: torch.Tensor, acc: torch.Tensor) -> None:
    """``acc = grad + residual`` and ``grad`` zeroed, in one pass."""
    library().accumulate(grad.data_ptr(), residual.data_ptr(), acc.data_ptr(), acc.numel())


def accumulate_topk(
    grad: torch.Tensor, residual: torch.Tensor, acc: torch.Tensor, positions: np.ndarray, ranks: Tuple[int, int], k: int
):
    """:func:`accumulate`, then :func:`topk_sampled` of ``acc`` sampled at ``positions`` (int64,
    ascending), with the filter done in the same pass: ``(values, indices)``, or ``None`` where it
    would fall back (``acc`` is written either way)."""
    sample = np.empty(positions.size, dtype=np.int32)
    return _selected(
        acc.numel(),
        k,
        lambda found, scratch, capacity, indices, values: library().accumulate_topk(
            grad.data_ptr(),
            residual.data_ptr(),
            acc.data_ptr(),
            acc.numel(),
            positions.ctypes.data,
            sample.ctypes.data,
            positions.size,
            ranks[0],
            ranks[1],
            k,
            found,
            scratch,
            capacity,
            indices,
            values,
        ),
    )


def topk_sampled(x: torch.Tensor, sample: np.ndarray, ranks: Tuple[int, int], k: int):
    """:func:`raytopk.compression._topk_above_sampled_threshold` for a float32 ``x``, in one call:
    ``(values, indices)``, or ``None`` where it would fall back. ``sample`` (int32 magnitudes) is reordered."""
    return _selected(
        x.numel(),
        k,
        lambda found, scratch, capacity, indices, values: library().topk_sampled(
            x.data_ptr(),
            x.numel(),
            sample.ctypes.data,
            sample.size,
            ranks[0],
            ranks[1],
            k,
            found,
            scratch,
            capacity,
            indices,
            values,
        ),
    )


def _selected(n: int, k: int, select):
    """Call ``select`` with room for the positions a threshold lets through (a quarter of ``n``, and
    the 4 entries a vector store may write past it) and for the result; ``(values, indices)`` or ``None``.

    The result is written as :func:`raytopk.compression.pack` lays out a payload (the ``k`` indices,
    then the ``k`` values, in one buffer), so packing it copies nothing."""
    capacity = n // 4 + 1024
    found, scratch = np.empty(capacity + 4, dtype=np.int32), np.empty(capacity, dtype=np.int32)
    payload = torch.empty(8 * k, dtype=torch.uint8, device="cpu")  # the C kernels run on CPU tensors only
    indices, values = payload[: 4 * k].view(torch.int32), payload[4 * k :].view(torch.float32)
    chosen = select(found.ctypes.data, scratch.ctypes.data, capacity, indices.data_ptr(), values.data_ptr())
    return None if chosen < 0 else (values, indices)


def scatter_add_rows(out: torch.Tensor, rows: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """``out.index_add_(0, indices, values, alpha=scale)`` for each row of ``rows`` (a uint8 tensor, one
    :func:`~raytopk.compression.pack`-ed float32 payload of ``k`` int32 indices a row); every row's indices, as one
    tensor."""
    touched = torch.empty(rows.shape[0] * k, dtype=torch.int32, device="cpu")
    library().scatter_add_rows(
        out.data_ptr(), rows.data_ptr(), rows.shape[0], rows.shape[1], k, scale, touched.data_ptr()
    )
    return touched


def clear_at(x: torch.Tensor, indices: torch.Tensor) -> None:
    """``x[indices] -= x[indices]``: zero where finite, NaN where not (what sending them in float32 leaves)."""
    library().clear_at(x.data_ptr(), indices.data_ptr(), indices.numel())


def finite_at(x: torch.Tensor, indices: torch.Tensor) -> bool:
    """``torch.isfinite(x[indices]).all()`` for int32 ``indices``, as a bool."""
    return bool(library().finite_at(x.data_ptr(), indices.data_ptr(), indices.numel()))
