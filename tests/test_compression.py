"""select_topk is exact on every path; pack/unpack round-trip every value dtype."""

import math

import numpy as np
import pytest
import torch

from raytopk.compression import (
    VALUE_DTYPES,
    _sample_positions,
    _topk_by_radix_select,
    _torch_topk,
    index_dtype,
    pack,
    payload_bytes,
    select_topk,
    unpack,
)


def _topk_set(x, k):
    return set(torch.topk(x.abs(), k).indices.tolist())


@pytest.mark.parametrize("numel", [1, 17, 5_000, 300_000, 2_000_003])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3])
def test_same_set_as_torch_topk(numel, fraction):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    k = max(1, math.ceil(fraction * numel))
    values, indices = select_topk(x, k)
    assert indices.dtype == torch.int32
    assert len(indices) == k
    assert set(indices.tolist()) == _topk_set(x, k)
    assert torch.equal(values, x[indices.long()])


@pytest.mark.parametrize(
    "make, k",
    [
        (lambda n, g: torch.randn(n, generator=g) ** 7, 10_000),  # heavy tails
        (
            lambda n, g: torch.where(torch.rand(n, generator=g) < 0.995, 0.0, torch.randn(n, generator=g)),
            2_000,
        ),  # ~5,000 nonzero
        (lambda n, g: torch.linspace(-1, 1, n), 10_000),  # sorted: neighbours share magnitudes
        (
            lambda n, g: torch.cat([torch.zeros(n - 50), 1e6 * torch.randn(50, generator=g)]),
            20,
        ),  # few spikes at the end
        (
            lambda n, g: -torch.rand(n, generator=g),
            10_000,
        ),  # all negative: the largest magnitudes are the smallest values
    ],
)
def test_fast_path_exact_on_hard_distributions(make, k):
    """k is below the count of nonzero entries, so only the true top-k magnitudes pass (not any k, nor the top-k
    values)."""
    n = 1_000_000
    x = make(n, torch.Generator().manual_seed(1))
    assert int((x != 0).sum()) > k
    values, indices = select_topk(x, k)
    assert len(set(indices.tolist())) == k and torch.equal(values, x[indices.long()])
    assert torch.equal(values.abs().sort().values, torch.topk(x.abs(), k).values.sort().values)


def _no_full_topk(monkeypatch):
    """Make the fallback to a full ``torch.topk`` fail the test: the sampled path must answer alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("select_topk fell back to a full torch.topk")

    monkeypatch.setattr(torch, "topk", refuse)


@pytest.mark.parametrize("nonzero", [0, 1, 700, 9_999])
def test_fewer_nonzero_entries_than_k_are_all_kept_then_the_first_zeros(nonzero, monkeypatch):
    """A mostly-zero gradient (dead units, an embedding's unused rows): no full sort, and the tied zeros kept are the
    first ones."""
    n, k = 1_000_000, 10_000
    where = torch.randperm(n, generator=torch.Generator().manual_seed(nonzero))[:nonzero]
    x = torch.zeros(n)
    x[where] = torch.randn(nonzero, generator=torch.Generator().manual_seed(1))
    x[where[:1]] = -0.0 if nonzero == 1 else x[where[:1]]  # a negative zero is a zero too
    _no_full_topk(monkeypatch)
    values, indices = select_topk(x, k)
    nonzero_at = set(torch.nonzero(x).flatten().tolist())
    zeros_kept = sorted(set(indices.tolist()) - nonzero_at)
    assert len(set(indices.tolist())) == k and nonzero_at <= set(indices.tolist())
    assert zeros_kept == [i for i in range(n) if i not in nonzero_at][: k - len(nonzero_at)]
    assert torch.equal(values, x[indices.long()])


def test_a_misleading_sample_gets_a_second_lower_threshold_not_a_full_sort(monkeypatch):
    """The sampled entries are all large, so the first threshold lets too few pass; the second, four times lower in the
    sample, suffices."""
    n, k = 1_000_000, 10_000
    generator = torch.Generator().manual_seed(2)
    sampled = torch.from_numpy(_sample_positions(n, k).astype(np.int64))
    x = torch.rand(n, generator=generator)  # everything else: magnitudes below 1
    x[sampled] = 2 + torch.rand(len(sampled), generator=generator)  # the sample: 2 to 3
    unsampled = torch.ones(n, dtype=torch.bool)
    unsampled[sampled] = False
    between = torch.nonzero(unsampled).flatten()[::50][:k]  # not sampled, above the second threshold, below the first
    x[between] = -(2.95 + 0.03 * torch.rand(len(between), generator=generator))
    expected = _topk_set(x, k)
    _no_full_topk(monkeypatch)
    values, indices = select_topk(x, k)
    assert set(indices.tolist()) == expected and torch.equal(values, x[indices.long()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [1_000_000, 1_048_577])  # even, and odd past a whole chunk
def test_exact_for_every_dtype_and_odd_sizes(dtype, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(3)).to(dtype)
    k = numel // 100
    values, indices = select_topk(x, k)
    kth = torch.topk(x.abs(), k).values.min()
    assert len(set(indices.tolist())) == k and values.dtype == dtype
    assert bool((x[indices.long()].abs() >= kth).all()) and torch.equal(values, x[indices.long()])


def test_ties_give_k_distinct_entries():
    """600 entries stand above a million tied ones: all 600 are kept, and 400 distinct tied ones fill k = 1000."""
    x = torch.ones(1_000_000)
    above = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:600]
    x[above] = -2.0
    values, indices = select_topk(x, 1000)
    assert len(set(indices.tolist())) == 1000
    assert set(above.tolist()) <= set(indices.tolist()) and int((values == 1.0).sum()) == 400


def test_same_ties_kept_whatever_ran_before():
    """Many entries tie at the k-th magnitude; the ones kept must not depend on earlier calls (a resumed process)."""
    x = torch.randint(0, 1000, (1 << 20,), generator=torch.Generator().manual_seed(0)).float() / 1000
    first = select_topk(x, 1 << 13)[1]
    for seed in range(8):
        select_topk(torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)), 1 << 13)
        assert torch.equal(select_topk(x, 1 << 13)[1], first)


def test_nan_and_inf_are_selected_like_torch_topk():
    x = torch.randn(1_000_000)
    x[123] = float("nan")
    x[456] = float("-inf")
    values, indices = select_topk(x, 100)
    assert {123, 456} <= set(indices.tolist())
    assert not bool(torch.isfinite(values).all())


def test_does_not_touch_the_global_random_streams():
    torch.manual_seed(7)
    np.random.seed(7)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    select_topk(torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)), 1000)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_strided_input_is_exact():
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(5))[::2]
    values, indices = select_topk(x, 10_000)
    assert set(indices.tolist()) == _topk_set(x, 10_000) and torch.equal(values, x[indices.long()])


@pytest.mark.parametrize("k, shape", [(0, (10,)), (11, (10,)), (1, (2, 5))])
def test_rejects_bad_k_and_shapes(k, shape):
    with pytest.raises(ValueError):
        select_topk(torch.randn(shape), k)


@pytest.mark.parametrize("name", sorted(VALUE_DTYPES))
@pytest.mark.parametrize("k", [1, 7, 64])
def test_pack_unpack_round_trip(name, k):
    dtype = VALUE_DTYPES[name]
    x = torch.randn(1000)
    values, indices = select_topk(x, k)
    buffer = pack(values, indices, dtype)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == payload_bytes(k, x.numel(), dtype) == k * (4 + torch.finfo(dtype).bits // 8)
    got_values, got_indices = unpack(buffer, k, x.numel(), dtype)
    assert torch.equal(got_indices, indices)
    assert torch.equal(got_values, values.to(dtype))


def test_pack_returns_entries_already_laid_out_as_a_payload_without_a_copy():
    k = 5
    payload = torch.empty(8 * k, dtype=torch.uint8)
    indices, values = payload[: 4 * k].view(torch.int32), payload[4 * k :].view(torch.float32)
    indices.copy_(torch.tensor([3, 1, 4, 15, 9], dtype=torch.int32))
    values.copy_(torch.randn(k))
    copied = torch.cat([indices.view(torch.uint8), values.view(torch.uint8)])
    packed = pack(values, indices, torch.float32)
    assert packed.data_ptr() == payload.data_ptr() and torch.equal(packed, copied)
    # Entries in one buffer but not in pack's order, or sent in another dtype, are copied.
    swapped_values, swapped_indices = payload[: 4 * k].view(torch.float32), payload[4 * k :].view(torch.int32)
    swapped = pack(swapped_values, swapped_indices, torch.float32)
    assert swapped.data_ptr() != payload.data_ptr() and torch.equal(
        swapped, torch.cat([payload[4 * k :], payload[: 4 * k]])
    )
    halved = pack(values, indices, torch.float16)
    assert torch.equal(halved, torch.cat([indices.view(torch.uint8), values.half().view(torch.uint8)]))


def test_past_two_to_the_31_entries_indices_are_int64_on_the_wire():
    """A bucket of 2**31 entries or more: indices take 8 bytes; pack and unpack carry positions above int32's range."""
    numel = 2**31 + 5
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(numel) == torch.int64
    assert payload_bytes(10, numel, torch.float16) == 10 * (8 + 2) and payload_bytes(
        10, 2**31 - 1, torch.float16
    ) == 10 * (4 + 2)
    indices = torch.tensor([0, 2**31 - 1, 2**31, numel - 1], dtype=torch.int64)
    values = torch.tensor([1.5, -2.0, 3.25, -4.5])
    buffer = pack(values, indices, torch.bfloat16)
    assert buffer.numel() == payload_bytes(4, numel, torch.bfloat16)
    got_values, got_indices = unpack(buffer, 4, numel, torch.bfloat16)
    assert (
        got_indices.dtype == torch.int64
        and torch.equal(got_indices, indices)
        and torch.equal(got_values.float(), values)
    )


@pytest.mark.parametrize("select", [select_topk, _topk_by_radix_select], ids=["select_topk", "radix_select"])
@pytest.mark.parametrize("numel", [7, 1000, 40_000, 300_001])
def test_ties_at_the_kth_magnitude_keep_the_lowest_positions(numel, select):
    """The tie rule on its own, against a set written down here: every path keeps the lowest positions among ties."""
    x = torch.full((numel,), 0.5)
    x[1::2] = -0.5  # every entry ties at magnitude 0.5 ...
    x[numel - 1], x[numel // 2] = 3.0, -2.0  # ... but two, which are always kept
    k = min(numel, 5 + numel // 100)
    expected = {numel - 1, numel // 2} | set(i for i in range(numel) if i not in (numel - 1, numel // 2))
    expected = {numel - 1, numel // 2} | set(sorted(expected - {numel - 1, numel // 2})[: k - 2])
    values, indices = select(x, k)
    assert set(indices.tolist()) == expected
    assert torch.equal(values, x[indices.long()])


def _hard_inputs(dtype):
    """Gradients that stress a threshold: plain, few distinct values, mostly zeros, NaN payloads and infinities."""
    gen = torch.Generator().manual_seed(11)
    plain = torch.randn(300_001, generator=gen)
    coarse = torch.randint(-40, 41, (65_537,), generator=gen).float() / 8
    sparse = torch.zeros(50_000)
    sparse[torch.randperm(50_000, generator=gen)[:30]] = torch.randn(30, generator=gen)
    odd = torch.randn(10_000, generator=gen)
    odd[[5, 70, 900]] = float("nan")
    odd[6], odd[71] = float("inf"), float("-inf")
    odd.view(torch.int32)[70] |= 0x3FFFFF  # a NaN with other payload bits: still one NaN, tied with the rest
    return [x.to(dtype) for x in (plain, coarse, sparse, odd)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_radix_select_picks_the_cpu_paths_set(dtype):
    """The GPU path (a radix select on the magnitudes' bits) checked on CPU: the same entries as the CPU path, ties and
    NaNs by the same rule, for k from one entry to all of them."""
    for x in _hard_inputs(dtype):
        for k in {1, 3, max(1, x.numel() // 1000), x.numel() // 100, 40, x.numel()}:
            values, indices = _topk_by_radix_select(x, k)
            expected_values, expected = _torch_topk(x, k)
            assert indices.dtype == expected.dtype and torch.equal(indices.sort().values, expected.sort().values)
            assert torch.equal(values.view(torch.uint8), x[indices.long()].view(torch.uint8))  # NaNs compared as bits
