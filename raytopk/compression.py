"""Pure tensor functions for top-k gradient sparsification.

Three steps turn a flat gradient into what crosses the network and back:

1. :func:`select_topk` picks the ``k`` entries of largest magnitude, exactly.
2. :func:`pack` puts their indices and values into one byte buffer, so a
   single ``all_gather`` carries both (values in fp32, fp16 or bf16).
3. :func:`unpack` reads a peer's buffer back and the caller scatter-adds it.

Nothing here touches ``torch.distributed``: the DDP hook in :mod:`raytopk.hook`
owns the communication and the residuals.

Why a fast path: ``torch.topk`` on a large CPU tensor sorts far more than it
needs and costs about ten passes over memory. The k largest magnitudes are
almost always above a threshold that a small random sample predicts, so
:func:`select_topk` estimates that threshold, keeps only the entries at or
above it (one streaming pass in cache-sized chunks), and runs the exact
``torch.topk`` on those few candidates. When the sample misleads and fewer
than ``k`` entries pass, it falls back to a full ``torch.topk``: the result is
always the exact top-k, only the time changes.
"""

import math

import torch

__all__ = ["select_topk", "index_dtype", "pack", "unpack", "payload_bytes"]

# Below this many elements (or above this fraction selected) the plain
# torch.topk is as fast as the sampled path.
_FAST_PATH_MIN_NUMEL = 1 << 18
_FAST_PATH_MAX_FRACTION = 0.05
# The sample that estimates the threshold, and the chunk the filter streams
# through (256K floats = 1 MiB, which stays in a core's L2 cache).
_SAMPLE_SIZE = 1 << 16
_CHUNK_NUMEL = 1 << 18
# A private generator: sampling must not shift the training's random stream.
_SAMPLER = torch.Generator().manual_seed(0)

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices when every position fits in 31 bits, else int64."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def select_topk(x: torch.Tensor, k: int):
    """Return ``(values, indices)`` of the ``k`` largest-magnitude entries of ``x``.

    ``x`` is a flat tensor on any device. ``values`` keep their sign and dtype;
    ``indices`` are int32 when they fit (see :func:`index_dtype`). The set is
    the same as ``torch.topk(x.abs(), k)`` selects, ties aside; NaN counts as
    largest, as in ``torch.topk``, so a non-finite gradient is always selected.
    """
    if x.dim() != 1:
        raise ValueError(f"select_topk expects a flat tensor, got shape {tuple(x.shape)}")
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a tensor of {n} elements, got {k}")
    if x.device.type == "cpu" and n >= _FAST_PATH_MIN_NUMEL and k <= _FAST_PATH_MAX_FRACTION * n:
        candidates = _candidates_above_sampled_threshold(x, k)
        if candidates is not None:
            _, best = torch.topk(x[candidates].abs(), k, sorted=False)
            indices = candidates[best]
            return x[indices], indices.to(index_dtype(n))
    _, indices = torch.topk(x.abs(), k, sorted=False)
    return x[indices], indices.to(index_dtype(n))


def _candidates_above_sampled_threshold(x: torch.Tensor, k: int):
    """Indices (int64) of every entry whose magnitude reaches a sampled threshold.

    The threshold is the magnitude that a random sample says about ``1.2 k``
    entries exceed, lowered by four standard deviations of the sample count,
    so the candidates hold at least ``k`` entries with overwhelming
    probability. Returns ``None`` when they do not (the caller then falls back).
    Entries below the threshold can never be in the top-k once ``k`` candidates
    reach it, which is what makes the result exact.
    """
    n = x.numel()
    sample = x[torch.randint(n, (_SAMPLE_SIZE,), generator=_SAMPLER)].abs()
    expected = _SAMPLE_SIZE * k / n
    rank = min(_SAMPLE_SIZE, int(1.2 * expected + 4.0 * math.sqrt(expected)) + 1)
    threshold = torch.topk(sample, rank, sorted=False).values.min()

    found = []
    magnitude = torch.empty(min(n, _CHUNK_NUMEL), dtype=x.dtype)
    below = torch.empty(magnitude.shape, dtype=torch.bool)
    for start in range(0, n, _CHUNK_NUMEL):
        chunk = x[start : start + _CHUNK_NUMEL]
        m, b = magnitude[: chunk.numel()], below[: chunk.numel()]
        torch.abs(chunk, out=m)
        torch.lt(m, threshold, out=b)  # NaN is never below: it stays a candidate
        hits = torch.nonzero(b.logical_not_()).squeeze(1)
        if hits.numel():
            found.append(hits.add_(start))
    if not found:
        return None
    candidates = torch.cat(found)
    return candidates if candidates.numel() >= k else None


def payload_bytes(k: int, numel: int, value_dtype: torch.dtype) -> int:
    """Bytes of one packed buffer of ``k`` entries from a tensor of ``numel``."""
    value_size = torch.empty((), dtype=value_dtype).element_size()
    index_size = torch.empty((), dtype=index_dtype(numel)).element_size()
    return k * (value_size + index_size)


def pack(values: torch.Tensor, indices: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """Indices then values, cast to ``value_dtype``, as one uint8 buffer.

    Indices go first so both parts stay aligned for :func:`unpack`'s views.
    """
    return torch.cat([indices.view(torch.uint8), values.to(value_dtype).view(torch.uint8)])


def unpack(buffer: torch.Tensor, k: int, numel: int, value_dtype: torch.dtype):
    """Inverse of :func:`pack`: ``(values, indices)`` as views of ``buffer``."""
    idx_dtype = index_dtype(numel)
    split = k * torch.empty((), dtype=idx_dtype).element_size()
    return buffer[split:].view(value_dtype), buffer[:split].view(idx_dtype)
