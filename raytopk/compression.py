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
:func:`select_topk` estimates that threshold, keeps only the entries above it
(one streaming read in cache-sized chunks, comparing the floats' bits as
integers), and drops the few smallest candidates beyond ``k``. When the
sample misleads and fewer than ``k`` entries pass, a lower threshold gets a
second pass, and only then a full ``torch.topk`` runs: the result is always
the exact top-k, only the time changes. On a GPU, where a sample's threshold
would make the host wait to learn how many entries passed, a radix select on
the magnitudes' bits finds the k-th largest in a few passes and gathers
exactly ``k`` positions, all on the device: Triton kernels
(:mod:`raytopk.triton_kernels`) where Triton is, else PyTorch calls.
"""

import functools
import math

import numpy as np
import torch

from raytopk import kernels, options
from raytopk.devices import on_host

__all__ = ["select_topk", "accumulate_topk", "index_dtype", "pack", "unpack", "payload_bytes"]

# Below this many elements (or above this fraction selected) the plain
# torch.topk is as fast as the sampled path (one thread, python benchmarks/compression.py
# --sizes 8192 16384 18816 32768 262144 402826 -> results/compression_small.json:
# the sampled path 1.2x faster than torch.topk at 32K entries, 8x at 262K; tried
# below 32K, it only matched torch.topk).
_FAST_PATH_MIN_NUMEL = 1 << 15
_FAST_PATH_MAX_FRACTION = 0.05
# The sample that estimates the threshold (one entry in 32, from 1K to 32K, in
# runs of 8: a larger sample costs more to partition than it saves), and the
# chunk the filter streams through (128K entries: the chunk and its two
# scratch arrays stay in L2).
_SAMPLE_SIZE, _MIN_SAMPLE_SIZE, _SAMPLE_RUN = 1 << 15, 1 << 10, 8
_CHUNK_NUMEL = 1 << 17

# Each value dtype of the fast path, and the integer type its bits are compared as.
_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
# Each dtype's largest magnitude key that orders by :func:`_topk_by_radix_select`: every NaN counts as one value above
# infinity, whatever its payload bits, so ties among NaNs keep the lowest positions as on the other paths.
_NAN_KEY = {dtype: torch.tensor(float("inf"), dtype=dtype).view(bits).item() + 1 for dtype, bits in _BITS_DTYPE.items()}
# Each value dtype by its option name (raytopk.options).
VALUE_DTYPES = {name: getattr(torch, dtype) for name, dtype in options.VALUE_DTYPES.items()}


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
    if _sampled(x, k):
        selected = _topk_above_sampled_threshold(x, k)
        if selected is not None:
            return selected
    return _torch_topk(x, k)


def accumulate_topk(grad: torch.Tensor, residual: torch.Tensor, acc: torch.Tensor, k: int):
    """``acc = grad + residual``, then ``grad`` zeroed, then :func:`select_topk` of ``acc``: the hook's first half.

    With raytopk's C kernels (:mod:`raytopk.kernels`) and float32 CPU tensors,
    the sample is added first, which gives the threshold, and then the add,
    the zeroing and the threshold's filter are one pass over memory instead of
    three (``acc`` is never read back); the result is the same, bit for bit.
    The values and indices come laid out as :func:`pack` lays them out.
    """
    n = acc.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a tensor of {n} elements, got {k}")
    if not on_host(acc):
        from raytopk import triton_kernels  # imported where the accelerator path runs: Triton's import takes 0.2 s

        if triton_kernels.usable(grad, residual, acc):
            return triton_kernels.accumulate_topk(grad, residual, acc, k)
    if not kernels.usable(grad, residual, acc):
        torch.add(grad, residual, out=acc)
        grad.zero_()
        return select_topk(acc, k)
    if not _sampled(acc, k):
        kernels.accumulate(grad, residual, acc)
        return _torch_topk(acc, k)
    selected = kernels.accumulate_topk(grad, residual, acc, _sample_positions(n, k), _sample_ranks(n, k), k)
    return selected if selected is not None else _torch_topk(acc, k)


def _sampled(x: torch.Tensor, k: int) -> bool:
    """Whether :func:`select_topk` takes the sampled-threshold path for ``x`` and ``k``."""
    n = x.numel()
    return on_host(x) and x.dtype in _BITS_DTYPE and n >= _FAST_PATH_MIN_NUMEL and k <= _FAST_PATH_MAX_FRACTION * n


def _torch_topk(x: torch.Tensor, k: int):
    """``torch.topk``'s exact set, with the tie rule of every path: among entries tied at the k-th magnitude, the lowest
    positions."""
    if not on_host(x):
        from raytopk import triton_kernels  # imported where the accelerator path runs: Triton's import takes 0.2 s

        return triton_kernels.topk(x, k) if triton_kernels.usable(x) else _topk_by_radix_select(x, k)
    magnitude = x.abs()
    largest = torch.topk(magnitude, k, sorted=False).values
    finite = largest[~torch.isnan(largest)]  # NaN counts as largest, as in torch.topk: always kept
    if not len(finite):
        indices = torch.nonzero(torch.isnan(magnitude)).reshape(-1)[:k]
    else:
        kth = finite.min()
        above = torch.nonzero((magnitude > kth) | torch.isnan(magnitude)).reshape(-1)
        indices = torch.cat([above, torch.nonzero(magnitude == kth).reshape(-1)[: k - len(above)]])
    return x[indices], indices.to(index_dtype(x.numel()))


def _topk_by_radix_select(x: torch.Tensor, k: int):
    """The exact top-k on any device, without the host waiting: the GPU path where Triton is not, as PyTorch calls
    (:mod:`raytopk.triton_kernels` runs the same algorithm in fewer passes, with the same result).

    A float's bits with the sign cleared order as its magnitude does (NaN
    above infinity above every finite value), so the k-th largest magnitude
    is found digit by digit on those integer keys, 16 bits at a time from the
    top: one histogram per digit of the keys that share the digits found so
    far, then the largest digit with at least the missing count at or above
    it (a radix select). Everything stays a tensor on the device; ``k`` is
    known, so ``torch.nonzero_static`` gathers the positions without asking
    how many there are. Among entries tied at the k-th magnitude the lowest
    positions are kept, as on every path (a running count of the ties).
    """
    bits_dtype = _BITS_DTYPE[x.dtype]
    key = x.detach().contiguous().view(bits_dtype) & torch.iinfo(bits_dtype).max
    key = key.clamp_(max=_NAN_KEY[x.dtype]).to(torch.int64 if bits_dtype == torch.int64 else torch.int32)
    kth, above = _kth_largest_key(key, k, torch.iinfo(bits_dtype).bits - 1)
    tied = key == kth
    chosen = (key > kth) | (tied & (torch.cumsum(tied, 0, dtype=index_dtype(key.numel())) <= k - above))
    indices = torch.nonzero_static(chosen, size=k).reshape(-1)
    return x[indices], indices.to(index_dtype(x.numel()))


def _kth_largest_key(key: torch.Tensor, k: int, key_bits: int):
    """The k-th largest of non-negative integer ``key`` s of ``key_bits`` bits, and how many keys are larger, as 0-dim
    tensors on ``key``'s device."""
    kth = torch.zeros((), dtype=key.dtype, device=key.device)
    above = torch.zeros((), dtype=torch.int64, device=key.device)
    one = torch.ones((), dtype=torch.int64, device=key.device).expand(key.numel())  # one count per key, no copy
    shift = key_bits
    while shift > 0:
        width = min(16, shift)
        shift -= width
        digit = (key >> shift) & ((1 << width) - 1)
        if shift + width < key_bits:  # keys whose higher digits differ from the k-th's count in a last, spare slot
            digit = torch.where((key >> (shift + width)) == (kth >> (shift + width)), digit, 1 << width)
        counts = torch.zeros((1 << width) + 1, dtype=torch.int64, device=key.device).index_add_(0, digit, one)
        counts[-1] = 0
        at_or_above = counts.flip(0).cumsum(0).flip(0)  # [d]: keys whose digit is d or more (0 past the last)
        found = (at_or_above[:-1] >= k - above).sum() - 1  # the largest digit that still holds the k-th key
        above = above + at_or_above.index_select(0, (found + 1).reshape(1)).reshape(())  # no host read
        kth = kth | (found.to(key.dtype) << shift)
    return kth, above


def _topk_above_sampled_threshold(x: torch.Tensor, k: int):
    """The exact top-k through a sampled threshold, or ``None`` when the sample misled twice.

    The threshold is the magnitude that a stratified sample says about ``1.05 k``
    entries exceed, lowered by four standard deviations of the sample count,
    so at least ``k`` entries exceed it with overwhelming probability. Entries
    at or below it can never be in the top-k once ``k`` entries exceed it,
    which is what makes the result exact. Gradients are not independent draws
    (a dead unit zeroes a whole row), so when fewer than ``k`` pass, a second
    threshold four times lower in the sample's ranking gets one more pass;
    only when that misses too does this return ``None`` and the caller fall
    back to ``torch.topk``.

    A tensor with fewer than ``k`` nonzero entries (frozen or dead units, an
    embedding's unused rows) needs no fallback: once the threshold reaches
    zero, every nonzero entry passes, and the zeros with the lowest indices
    fill the rest, so the choice among the tied zeros is a function of the
    tensor alone (as a resumed run needs).

    Everything compares the float's bits as integers: with the sign bit
    cleared, a float's bits order exactly as its magnitude does, infinities
    above every finite value and NaN above them all (so NaN counts as largest,
    as in ``torch.topk``). That makes ``|x| > threshold`` two integer kernels,
    run through numpy on a zero-copy view, whose compare and ``flatnonzero``
    are vectorized where PyTorch's CPU ``nonzero`` is not. The filter reads
    ``x`` once, in chunks that stay in cache between its kernels; the few
    smallest survivors beyond ``k`` are dropped by a partition, and among
    entries tied at the k-th magnitude the lowest positions are kept.

    For float32, raytopk's C kernel (:mod:`raytopk.kernels`) does all of this
    in one call, with the same result.
    """
    n = x.numel()
    bits = x.detach().view(_BITS_DTYPE[x.dtype]).numpy()
    magnitude = np.iinfo(bits.dtype).max  # every bit but the sign
    sample = bits[_sample_positions(n, k)] & magnitude
    size, ranks = sample.size, _sample_ranks(n, k)
    if kernels.usable(x):
        return kernels.topk_sampled(x, sample, ranks, k)
    # Both thresholds from one partition (on a sample of many equal values, such as
    # zeros, numpy's partition at both positions is also far quicker than at the first alone).
    ordered = np.partition(sample, [size - rank for rank in reversed(ranks)])
    for rank in ranks:
        threshold = ordered[size - rank]
        passed = _entries_above(bits, magnitude, threshold)
        if passed.size >= k or threshold == 0:
            break
    if passed.size >= k:
        # Keep those above the k-th largest magnitude, then as many equal to it as fit, lowest positions first.
        magnitudes = bits[passed] & magnitude
        kth = np.partition(magnitudes, passed.size - k)[passed.size - k]
        keep = magnitudes > kth
        keep[np.flatnonzero(magnitudes == kth)[: k - np.count_nonzero(keep)]] = True
        chosen = passed[keep]
    elif threshold == 0:
        chosen = np.concatenate([passed, _first_zeros(bits, magnitude, k - passed.size)])
    else:
        return None
    return torch.from_numpy(bits[chosen]).view(x.dtype), torch.from_numpy(chosen).to(index_dtype(n))


def _first_zeros(bits: np.ndarray, magnitude, count: int) -> np.ndarray:
    """The ``count`` lowest positions whose magnitude is zero, reading only as far as they reach."""
    found, start, step = [], 0, max(count, 1 << 12)
    while count > 0 and start < bits.size:
        zeros = np.flatnonzero((bits[start : start + step] & magnitude) == 0)[:count]
        found.append(zeros + start)
        count -= zeros.size
        start += step
    return np.concatenate(found)


def _entries_above(bits: np.ndarray, magnitude, threshold) -> np.ndarray:
    """Positions whose magnitude bits exceed ``threshold``, in order: one read of ``bits``, chunk by chunk."""
    n = bits.size
    chunk_numel = min(_CHUNK_NUMEL, n)
    cleared, above = np.empty(chunk_numel, bits.dtype), np.empty(chunk_numel, bool)
    hits = []
    for start in range(0, n, chunk_numel):
        end = min(start + chunk_numel, n)
        chunk_cleared, chunk_above = cleared[: end - start], above[: end - start]
        np.bitwise_and(bits[start:end], magnitude, out=chunk_cleared)
        np.greater(chunk_cleared, threshold, out=chunk_above)
        found = np.flatnonzero(chunk_above)
        found += start
        hits.append(found)
    return np.concatenate(hits)


def _sample_ranks(n: int, k: int):
    """The two thresholds' ranks in the sample (counted from its largest): about ``1.05 k`` of ``n``
    scaled to the sample, plus four standard deviations, then four times that."""
    size = _sample_size(n)
    expected = size * k / n
    first = min(size, int(1.05 * expected + 4.0 * math.sqrt(expected)) + 1)
    return first, min(size, 4 * first)


def _sample_size(n: int) -> int:
    """Entries sampled from a tensor of ``n``: one in 32, between 1K and 32K."""
    return min(_SAMPLE_SIZE, max(_MIN_SAMPLE_SIZE, n >> 5))


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int, k: int) -> np.ndarray:
    """Where :func:`_topk_above_sampled_threshold` samples a tensor of ``n`` entries: the same for every call with
    ``(n, k)``.

    A run of _SAMPLE_RUN entries at a random place in each of _SAMPLE_SIZE / _SAMPLE_RUN
    equal strata: stratified like the gradient's layout, and a few thousand memory pages
    touched instead of one page per sampled entry. Drawn from a generator seeded by
    ``(n, k)``, so the training's random streams do not move and the selection is a
    function of the tensor alone: among entries tied at the k-th magnitude, which are
    kept depends on the threshold, and a sample that followed earlier calls would make
    a resumed process keep other ties than the uninterrupted one did. A bucket's shape
    repeats every step, so each is drawn once.
    """
    strata = _sample_size(n) // _SAMPLE_RUN
    stride = n // strata
    starts = np.random.default_rng((n, k)).integers(0, stride - _SAMPLE_RUN + 1, strata) + np.arange(
        0, strata * stride, stride
    )
    positions = (starts[:, None] + np.arange(_SAMPLE_RUN)).ravel()
    positions.flags.writeable = False  # shared by every call
    return positions


def payload_bytes(k: int, numel: int, value_dtype: torch.dtype, dense: int = 0) -> int:
    """Bytes of one packed buffer: ``k`` indices and values from a tensor of ``numel``, plus ``dense`` bare values."""
    return k * (value_dtype.itemsize + index_dtype(numel).itemsize) + dense * value_dtype.itemsize


def pack(values: torch.Tensor, indices: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """Indices then values, cast to ``value_dtype``, as one uint8 buffer.

    ``values`` may run past ``indices``: the extra values travel bare, at
    positions both sides know (entries sent dense). Indices go first so both
    parts stay aligned for :func:`unpack`'s views. Entries a selection already
    wrote packed (as :func:`accumulate_topk`'s kernel does) are returned as
    their buffer, without a copy.
    """
    head = indices.view(torch.uint8)
    if (
        values.dtype == value_dtype
        and values.is_contiguous()
        and values.data_ptr() == head.data_ptr() + head.numel()
        and values.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    ):
        return head.as_strided((head.numel() + values.nbytes,), (1,))
    return torch.cat([head, values.to(value_dtype).view(torch.uint8)])


def unpack(buffer: torch.Tensor, k: int, numel: int, value_dtype: torch.dtype):
    """Inverse of :func:`pack`: ``(values, indices)`` as views of ``buffer`` (``k`` indices, every value)."""
    idx_dtype = index_dtype(numel)
    split = k * idx_dtype.itemsize
    return buffer[split:].view(value_dtype), buffer[:split].view(idx_dtype)
