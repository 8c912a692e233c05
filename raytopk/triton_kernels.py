"""The exact top-k on a GPU in a few passes over memory: Triton kernels for raytopk's accelerator path.

The accelerator path (:mod:`raytopk.devices`) cannot let the host read a
count, so its selection is a radix select: a float's bits with the sign
cleared order as its magnitude does (NaN above infinity above every finite
value), so the k-th largest magnitude is found digit by digit on those
integer keys, from the top. Written as PyTorch calls
(:func:`raytopk.compression._topk_by_radix_select`) that is a launch per
call, most of them a pass over the keys; here it is:

1. one pass per digit (:data:`DIGIT_BITS` bits: four passes for float32
   keys, two for float16 and bfloat16) that counts, per program in
   registers, the digit of every key that shares the digits found so far,
   and adds its counts to that digit's histogram. Each program first works
   out the digits found so far from the earlier histograms itself (a few
   hundred counts), so no launch in between picks them. The first pass also
   writes ``acc = grad + residual`` and zeroes ``grad`` when asked (the
   hook's accumulation, fused as the CPU kernels fuse it); the last keeps
   each program's histogram and its count of keys above the digits found;
2. one small launch that turns those into each program's count of keys
   above the k-th key and equal to it, without reading the keys again;
3. one pass that writes exactly ``k`` positions and values, in ascending
   position and packed for sending: every key above the k-th, then as many
   equal to it as fit, lowest positions first (the tie rule of every path),
   each program at the offset the counts before it give.

So a float32 bucket takes seven launches and five reads of its entries
(the first also reads the residual and writes both tensors, in place of a
separate add and zeroing).

Every size is known before the data arrive, so the host never waits. The
result is the same as the PyTorch path's, bit for bit, which the test suite
checks on the CPU by running these kernels in Triton's interpreter
(``TRITON_INTERPRET=1``), where they accept CPU tensors. Triton compiles
each kernel once per GPU type and caches it (``~/.triton/cache``);
``RAYTOPK_TRITON=0`` takes the PyTorch path instead.
"""

import contextlib
import functools
import os
import warnings

import torch

from raytopk.compression import _NAN_KEY, index_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton: the PyTorch radix select serves
    triton = None

__all__ = ["usable", "topk", "accumulate_topk", "DIGIT_BITS"]

DIGIT_BITS = 8  # bits per radix digit: 256 bins, which each program counts in registers
_BLOCK = 2048  # entries a program handles at a time
_MAX_PROGRAMS = 1024  # programs per pass; each walks a contiguous run of blocks, so positions keep their order
# Value dtypes whose keys (their bits without the sign: 31 or 15, a whole number of digits with the clear sign bit)
# the kernels read.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these kernels select over ``tensors``: CUDA float32, float16 or bfloat16 tensors of one dtype and
    fewer than 2**31 entries (the histograms count in int32), with Triton there (CPU tensors too under
    ``TRITON_INTERPRET=1``), unless ``RAYTOPK_TRITON=0`` chooses the PyTorch path."""
    return (
        triton is not None
        and os.environ.get("RAYTOPK_TRITON", "1") != "0"
        and all(t.dtype in _DTYPES and (t.is_cuda or (_interpreted() and t.device.type == "cpu")) for t in tensors)
        and all(t.numel() < 2**31 for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and _compiles(tensors[0].dtype, tensors[0].device)
    )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _compiles(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every kernel compiles and runs for ``dtype`` on ``device``, tried once on a throwaway tensor before a
    bucket's first selection: where Triton fails (a GPU or driver it does not support), the hook warns once and
    takes the PyTorch path instead of failing halfway through a bucket, with its gradient already zeroed."""
    if _interpreted():
        return True  # nothing to compile
    try:
        x = torch.ones(2 * _BLOCK * _MAX_PROGRAMS + 1, dtype=dtype, device=device)  # several blocks per program
        _select(x, 5)
        _select(torch.empty_like(x), 5, x.clone(), x)
        return True
    except Exception as error:  # Triton's compile and launch errors have no common base class
        warnings.warn(
            f"raytopk: Triton could not run its selection kernels for {dtype} on {device} ({error}); the hook "
            "takes its slower PyTorch path. RAYTOPK_TRITON=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def topk(x: torch.Tensor, k: int):
    """``(values, indices)`` of the ``k`` largest magnitudes of flat ``x`` (see the module), packed as
    :func:`raytopk.compression.pack` lays them out."""
    return _select(x, k)


def accumulate_topk(grad: torch.Tensor, residual: torch.Tensor, acc: torch.Tensor, k: int):
    """``acc = grad + residual`` and ``grad`` zeroed in the first pass, then :func:`topk` of ``acc``."""
    return _select(acc, k, grad, residual)


def _select(x: torch.Tensor, k: int, grad=None, residual=None):
    values, indices, launches = _plan(x, k, grad, residual)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        for kernel, programs, args, constants in launches:
            kernel[(programs,)](*args, **constants)
    return values, indices


def _plan(x: torch.Tensor, k: int, grad=None, residual=None):
    """The selection's outputs, its scratch tensors, and its launches: ``(values, indices, [(kernel, programs,
    arguments, constants), ...])``. Nothing runs yet (the tests compile exactly these for a GPU they do not have)."""
    n = x.numel()
    key_bits = 8 * x.element_size()
    passes = key_bits // DIGIT_BITS
    programs = min(_MAX_PROGRAMS, triton.cdiv(n, _BLOCK))
    blocks = triton.cdiv(triton.cdiv(n, _BLOCK), programs)
    keys = {
        "BITS_TYPE": tl.int32 if key_bits == 32 else tl.int16,
        "KEY_MASK": (1 << (key_bits - 1)) - 1,
        "NAN_KEY": _NAN_KEY[x.dtype],  # every NaN's key, whatever its payload
        "KEY_BITS": key_bits,
        "DIGIT": DIGIT_BITS,
        "BLOCK": _BLOCK,
    }
    histograms = torch.zeros(passes << DIGIT_BITS, dtype=torch.int32, device=x.device)  # one per digit
    # The last pass's histogram per program, and per program: its keys above the k-th, and those tied with it.
    program_histograms = torch.empty(programs << DIGIT_BITS, dtype=torch.int32, device=x.device)
    counts = torch.empty(2 * programs, dtype=torch.int64, device=x.device)
    idx_dtype = index_dtype(n)
    packed = torch.empty(k * (idx_dtype.itemsize + x.element_size()), dtype=torch.uint8, device=x.device)
    indices, values = packed[: k * idx_dtype.itemsize].view(idx_dtype), packed[k * idx_dtype.itemsize :].view(x.dtype)
    launches = []
    for done in range(passes):
        accumulate = grad is not None and done == 0
        sources = (grad, residual) if accumulate else (x, x)
        args = (x, *sources, n, k, blocks, histograms, program_histograms, counts)
        constants = {"DONE": done, "LAST": done == passes - 1, "ACCUMULATE": accumulate, **keys}
        launches.append((_histogram_kernel, programs, args, constants))
    args, constants = (k, histograms, program_histograms, counts), {"PASSES": passes, "KEY_BITS": key_bits}
    launches.append((_count_kernel, programs, args, {**constants, "DIGIT": DIGIT_BITS}))
    args = (x, n, k, blocks, histograms, counts, values, indices)
    launches.append((_write_kernel, programs, args, {"PASSES": passes, "MAX_PROGRAMS": _MAX_PROGRAMS, **keys}))
    return values, indices, launches


if triton is not None:

    @triton.jit
    def _keys(x, BITS_TYPE: tl.constexpr, KEY_MASK: tl.constexpr, NAN_KEY: tl.constexpr):
        """Magnitude keys of float values: their bits without the sign, every NaN one above infinity."""
        return tl.minimum(x.to(BITS_TYPE, bitcast=True).to(tl.int32) & KEY_MASK, NAN_KEY).to(tl.int64)

    @triton.jit
    def _kth_key(histograms_ptr, k, DONE: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT: tl.constexpr):
        """The k-th key's top ``DONE`` digits (the rest zero), and how many keys lie above every key that has them,
        from the first ``DONE`` histograms: each program works this out for itself, from a few hundred counts."""
        bins = tl.arange(0, 1 << DIGIT)
        kth = tl.zeros([], dtype=tl.int64)
        above = tl.zeros([], dtype=tl.int64)
        for done in tl.static_range(DONE):
            counts = tl.load(histograms_ptr + (done << DIGIT) + bins).to(tl.int64)
            at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
            digit = tl.sum((at_or_above >= k - above).to(tl.int64), 0) - 1  # the largest still holding the k-th
            above += tl.sum(tl.where(bins > digit, counts, 0), 0)
            kth = kth | (digit << (KEY_BITS - DIGIT * (done + 1)))
        return kth, above

    @triton.jit
    def _rounded(total, dtype: tl.constexpr):
        """``total`` (float32) in ``dtype`` as ``torch.add`` rounds it: to nearest, ties to even. Written out in
        integers for bfloat16, which Triton's interpreter would truncate."""
        if dtype == tl.bfloat16:
            bits = total.to(tl.int32, bitcast=True)
            upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            upper = tl.where(total != total, (bits >> 16) | 0x40, upper)  # NaN stays NaN
            return upper.to(tl.int16).to(tl.bfloat16, bitcast=True)
        return total.to(dtype)

    @triton.jit
    def _histogram_kernel(
        x_ptr,
        grad_ptr,
        residual_ptr,
        n,
        k,
        blocks,
        histograms_ptr,
        program_histograms_ptr,
        counts_ptr,
        DONE: tl.constexpr,
        LAST: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        BLOCK: tl.constexpr,
        BITS_TYPE: tl.constexpr,
        KEY_MASK: tl.constexpr,
        NAN_KEY: tl.constexpr,
        KEY_BITS: tl.constexpr,
        DIGIT: tl.constexpr,
    ):
        """Count, into histogram ``DONE``, the next digit of every key whose ``DONE`` digits above it are the k-th
        key's (``acc = grad + residual`` written first, and ``grad`` zeroed, when ``ACCUMULATE``). The ``LAST`` pass
        also keeps this program's histogram and its count of keys above those digits, which is all the count of
        its keys above and at the k-th key needs."""
        program = tl.program_id(0)
        known_shift = KEY_BITS - DIGIT * DONE
        start = program.to(tl.int64) * blocks * BLOCK
        kth, _ = _kth_key(histograms_ptr, k, DONE, KEY_BITS, DIGIT)
        counts = tl.zeros([1 << DIGIT], dtype=tl.int32)
        above = tl.zeros([], dtype=tl.int64)
        for block in range(blocks):
            offsets = start + block * BLOCK + tl.arange(0, BLOCK)
            valid = offsets < n
            if ACCUMULATE:
                grad = tl.load(grad_ptr + offsets, mask=valid, other=0)
                x = _rounded(grad.to(tl.float32) + tl.load(residual_ptr + offsets, mask=valid, other=0), grad.dtype)
                tl.store(x_ptr + offsets, x, mask=valid)
                tl.store(grad_ptr + offsets, tl.zeros_like(grad), mask=valid)
            else:
                x = tl.load(x_ptr + offsets, mask=valid, other=0)
            key = _keys(x, BITS_TYPE, KEY_MASK, NAN_KEY)
            counted = valid & ((key >> known_shift) == (kth >> known_shift))
            digit = ((key >> (known_shift - DIGIT)) & ((1 << DIGIT) - 1)).to(tl.int32)
            # Keys not counted land in bin 0 and are taken out of it again (histogram has no mask in every release).
            counts += tl.histogram(tl.where(counted, digit, 0), 1 << DIGIT)
            counts -= tl.where(tl.arange(0, 1 << DIGIT) == 0, tl.sum((~counted).to(tl.int32), 0), 0)
            if LAST:
                above += tl.sum((valid & ((key >> known_shift) > (kth >> known_shift))).to(tl.int64), 0)
        tl.atomic_add(histograms_ptr + (DONE << DIGIT) + tl.arange(0, 1 << DIGIT), counts)
        if LAST:
            tl.store(program_histograms_ptr + (program << DIGIT) + tl.arange(0, 1 << DIGIT), counts)
            tl.store(counts_ptr + 2 * program, above)

    @triton.jit
    def _count_kernel(
        k,
        histograms_ptr,
        program_histograms_ptr,
        counts_ptr,
        PASSES: tl.constexpr,
        KEY_BITS: tl.constexpr,
        DIGIT: tl.constexpr,
    ):
        """Per program, from its last-pass histogram: how many of its keys are above the k-th key, and how many
        equal it (without reading the keys again)."""
        program = tl.program_id(0)
        kth, _ = _kth_key(histograms_ptr, k, PASSES, KEY_BITS, DIGIT)
        bins = tl.arange(0, 1 << DIGIT)
        counts = tl.load(program_histograms_ptr + (program << DIGIT) + bins).to(tl.int64)
        digit = kth & ((1 << DIGIT) - 1)
        above = tl.load(counts_ptr + 2 * program) + tl.sum(tl.where(bins > digit, counts, 0), 0)
        tl.store(counts_ptr + 2 * program, above)
        tl.store(counts_ptr + 2 * program + 1, tl.sum(tl.where(bins == digit, counts, 0), 0))

    @triton.jit
    def _write_kernel(
        x_ptr,
        n,
        k,
        blocks,
        histograms_ptr,
        counts_ptr,
        values_ptr,
        indices_ptr,
        PASSES: tl.constexpr,
        MAX_PROGRAMS: tl.constexpr,
        BLOCK: tl.constexpr,
        BITS_TYPE: tl.constexpr,
        KEY_MASK: tl.constexpr,
        NAN_KEY: tl.constexpr,
        KEY_BITS: tl.constexpr,
        DIGIT: tl.constexpr,
    ):
        """Write this program's chosen positions and values at the slots the earlier programs' counts leave it:
        every key above the k-th, then ties while ``k`` allows (lowest positions first)."""
        program = tl.program_id(0)
        start = program.to(tl.int64) * blocks * BLOCK
        kth, above_kth = _kth_key(histograms_ptr, k, PASSES, KEY_BITS, DIGIT)
        ties_kept = k - above_kth
        earlier = tl.arange(0, MAX_PROGRAMS)
        above_before = tl.sum(tl.load(counts_ptr + 2 * earlier, mask=earlier < program, other=0), 0)
        tied_before = tl.sum(tl.load(counts_ptr + 2 * earlier + 1, mask=earlier < program, other=0), 0)
        for block in range(blocks):
            offsets = start + block * BLOCK + tl.arange(0, BLOCK)
            valid = offsets < n
            x = tl.load(x_ptr + offsets, mask=valid, other=0)
            key = _keys(x, BITS_TYPE, KEY_MASK, NAN_KEY)
            above = (key > kth) & valid
            tied = (key == kth) & valid
            tie_rank = tied_before + tl.cumsum(tied.to(tl.int64), 0) - 1
            chosen = above | (tied & (tie_rank < ties_kept))
            slot = above_before + tl.minimum(tied_before, ties_kept) + tl.cumsum(chosen.to(tl.int64), 0) - 1
            tl.store(indices_ptr + slot, offsets.to(indices_ptr.dtype.element_ty), mask=chosen)
            tl.store(values_ptr + slot, x, mask=chosen)
            above_before += tl.sum(above.to(tl.int64), 0)
            tied_before += tl.sum(tied.to(tl.int64), 0)
