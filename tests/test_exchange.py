"""The exchanges of raytopk.exchange on real gloo groups of 2, 3 and 4 processes, and the cost model."""

import math
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk import TopKState, topk_hook
from raytopk.compression import select_topk
from raytopk.cost_model import Layout, Link, accurate_exchanges, budget, choose, cost, selected, sharded_counts
from raytopk.exchange import Exchanger, sharded

from ranks import run_ranks
from test_hook import _train

# (world size, ranks per node): flat groups, one node, and two nodes of two.
LAYOUTS = [(2, 1), (3, 1), (4, 1), (2, 2), (4, 2)]


def _as_nodes(local_world_size):
    """Say, as torchrun and Ray Train do, how many ranks share this rank's node."""
    rank = dist.get_rank()
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    os.environ["LOCAL_RANK"] = str(rank % local_world_size)


def _integer_acc(rank, numel, seed):
    """Integer-valued floats with distinct magnitudes per rank: every sum is exact, in any order."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randint(-1000, 1000, (numel,), generator=g).float()


def _gather_all(tensor):
    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor)
    return torch.stack(everyone)


def _run(algorithm, acc, k, local_world_size, capacity=None, keep=None, capacity_factor=1.25):
    """One exchange of ``acc`` with a budget of ``k`` (or sharded's top-``k`` with explicit slots); returns ``out`` (the
    sum) and the cleared positions; ``acc`` becomes the residual."""
    out = torch.zeros_like(acc)
    if algorithm == "sharded" and capacity is not None:
        values, indices = select_topk(acc, k)
        future, sent = sharded(acc, values, indices, torch.float32, dist.group.WORLD, out, capacity, keep)
    else:
        _as_nodes(local_world_size)
        exchanger = Exchanger(algorithm, dist.group.WORLD, Link(), capacity_factor)
        future, sent, *_ = exchanger.run(algorithm, acc, k, torch.float32, out)
    result, cleared, _ = future.wait()
    assert result is out
    return out, cleared.nonzero().reshape(-1) if cleared.dtype == torch.bool else cleared, sent


def _decoding_reported(rank, world_size, algorithm, local_world_size):
    _as_nodes(local_world_size)
    seconds = []
    exchanger = Exchanger(algorithm, dist.group.WORLD, Link(), 1.25, on_decoded=seconds.append)
    acc = _integer_acc(rank, 4000, 0)
    exchanger.run(algorithm, acc, 40, torch.float32, torch.zeros_like(acc)).future.wait()
    return seconds


@pytest.mark.parametrize(
    "algorithm, world_size, local_world_size",
    [("allgather", 2, 1), ("sharded", 3, 1), ("hierarchical", 2, 1), ("hierarchical", 4, 2)],
)
def test_every_gather_reports_how_long_its_decoding_took(algorithm, world_size, local_world_size):
    """What the hook adds to ``stats["hook_s"]`` when a gather lands (its scatter-adds), from every exchange."""
    for seconds in run_ranks(_decoding_reported, world_size, algorithm, local_world_size):
        assert seconds and all(0 < s < 10 for s in seconds), seconds


def _invariant(rank, world_size, algorithm, local_world_size):
    """Small capacities make entries overflow and owners drop sums: still nothing is lost, exactly."""
    results = []
    for seed, (numel, k) in enumerate([(1000, 40), (997, 7), (64, 64)]):
        acc = _integer_acc(rank, numel, seed)
        total = _gather_all(acc).sum(0)
        out, _, _ = _run(algorithm, acc, k, local_world_size, capacity_factor=1.0)
        residuals = _gather_all(acc).sum(0)
        assert torch.equal(_gather_all(out), out.expand(world_size, -1)), "ranks got different updates"
        assert torch.equal(residuals + out, total), (
            f"lost {float((total - residuals - out).abs().max())} at numel {numel}"
        )
        results.append(int((out != 0).sum()))
    return results


@pytest.mark.parametrize(
    "algorithm, world_size, local_world_size",
    [(a, w, 1) for a in ("allgather", "sharded") for w in (2, 3, 4)]
    + [("allgather", 4, 2), ("sharded", 4, 2)]
    + [("hierarchical", w, local) for w, local in LAYOUTS + [(10, 2)]],  # 5 nodes: sharded across them
)
def test_error_feedback_loses_nothing(algorithm, world_size, local_world_size):
    updated = run_ranks(_invariant, world_size, algorithm, local_world_size)
    assert all(count > 0 for count in updated[0]), "the exchange sent nothing: the test did not exercise it"


def _keep_everything(rank, world_size, algorithm, local_world_size):
    """Room for every entry: the exchange is a dense allreduce of the same sparse inputs, bit for bit."""
    numel = 600
    acc = _integer_acc(rank, numel, 7)
    if algorithm == "hierarchical":
        k = numel  # the node's sum is selected whole
        sparse = acc.clone()
        out, _, _ = _run(algorithm, acc, k, local_world_size)
    else:
        k = 50
        values, indices = select_topk(acc, selected("allgather", k, world_size) if algorithm == "allgather" else k)
        sparse = torch.zeros(numel).index_put_((indices.long(),), values)
        out, cleared, _ = _run(algorithm, acc, k, local_world_size, capacity=k, keep=world_size * k)
        assert torch.equal(torch.sort(cleared).values, torch.sort(indices.long()).values), "a sent entry was not used"
    dist.all_reduce(sparse)
    assert torch.equal(out, sparse)
    assert (
        not acc.count_nonzero() if algorithm == "hierarchical" else torch.equal(acc[cleared], torch.zeros(len(cleared)))
    )
    return True


@pytest.mark.parametrize("algorithm, world_size", [(a, w) for a in ("allgather", "sharded") for w in (2, 3, 4)])
def test_flat_exchanges_with_room_for_everything_equal_a_dense_allreduce(algorithm, world_size):
    assert all(run_ranks(_keep_everything, world_size, algorithm, 1))


@pytest.mark.parametrize("world_size, local_world_size", [(2, 2), (4, 2)])
def test_hierarchical_selecting_everything_equals_a_dense_allreduce(world_size, local_world_size):
    assert all(run_ranks(_keep_everything, world_size, "hierarchical", local_world_size))


def _bytes_as_modelled(rank, world_size, algorithm, local_world_size):
    numel, k = 5000, 50
    _, _, sent = _run(algorithm, _integer_acc(rank, numel, 3), k, local_world_size)
    return sent, cost(
        algorithm, Layout(world_size, local_world_size if algorithm == "hierarchical" else 1), numel, k
    ).bytes_sent


@pytest.mark.parametrize(
    "algorithm, world_size, local_world_size", [("allgather", 3, 1), ("sharded", 4, 1), ("hierarchical", 4, 2)]
)
def test_counted_bytes_are_the_cost_models(algorithm, world_size, local_world_size):
    for sent, modelled in run_ranks(_bytes_as_modelled, world_size, algorithm, local_world_size):
        assert sent == modelled


# the hook with each exchange, under DDP ---------------------------------------------------


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    )


def _loss(model, rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _hook_conserves_mass(rank, world_size, exchange, local_world_size):
    _as_nodes(local_world_size)
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.005)
    # auto at 4 flat ranks: all-gather, the more accurate there.
    state = TopKState(ratio=0.05, start_iter=1, module=model, exchange=exchange, link_latency_us=0)
    ddp.register_comm_hook(state, topk_hook)
    applied = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    mean_grads = torch.zeros_like(applied)
    for step in range(6):
        ddp.zero_grad()
        _loss(ddp, rank, step).backward()
        applied += _flat(p.grad for p in model.parameters()).double()
        local = _model()
        local.load_state_dict(model.state_dict())
        _loss(local, rank, step).backward()
        grad = _flat(p.grad for p in local.parameters())
        dist.all_reduce(grad)
        mean_grads += grad.double() / world_size
    residual = _flat(state.state_dict()["residuals"][name] for name, _ in model.named_parameters())
    dist.all_reduce(residual)
    torch.testing.assert_close(applied + residual.double() / world_size, mean_grads, rtol=1e-5, atol=1e-6)
    return state.algorithms, state.stats


@pytest.mark.parametrize(
    "exchange, world_size, local_world_size", [("sharded", 3, 1), ("hierarchical", 4, 2), ("auto", 4, 1)]
)
def test_hook_conserves_the_gradient_with_each_exchange(exchange, world_size, local_world_size):
    for algorithms, stats in run_ranks(_hook_conserves_mass, world_size, exchange, local_world_size):
        expected = "allgather" if exchange == "auto" else exchange
        assert set(algorithms) == {expected}, algorithms
        assert 0 < stats["bytes_sent"] < stats["dense_bytes"]


def _resume(rank, world_size, exchange, local_world_size, options):
    """Train 8 steps straight, and 4 + 4 with a checkpoint between (new DDP, new state): the weights must match."""
    _as_nodes(local_world_size)
    options = {"exchange": exchange, **options}
    straight, checkpoint, _ = _train(rank, 8, 0, cap_mb=0.005, options=options)
    resumed, _, state = _train(rank, 4, 4, cap_mb=0.005, saved=checkpoint, options=options)
    return bool(torch.equal(straight, resumed)), set(state.algorithms)


# DGC's momentum correction and sparsity warm-up, fp16 values: what each exchange must keep through a resume too.
DGC_FP16 = {"momentum": 0.9, "warmup_ratio": 0.3, "warmup_steps": 4, "clip_norm": 5.0, "value_dtype": "fp16"}


@pytest.mark.parametrize(
    "exchange, world_size, local_world_size, options",
    [
        ("allgather", 2, 1, {}),
        ("sharded", 3, 1, {}),
        ("hierarchical", 4, 2, {}),
        ("sharded", 3, 1, DGC_FP16),
        ("hierarchical", 4, 2, DGC_FP16),
    ],
)
def test_resume_is_exact_with_each_exchange(exchange, world_size, local_world_size, options):
    for equal, used in run_ranks(_resume, world_size, exchange, local_world_size, options):
        assert equal and used == {exchange}


def _uneven_nodes(rank, world_size):
    os.environ["LOCAL_WORLD_SIZE"] = "2" if rank < 2 else "1"
    os.environ["LOCAL_RANK"] = str(rank % 2 if rank < 2 else 0)
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        Exchanger("hierarchical", dist.group.WORLD, Link(), 1.25)
    return Exchanger("auto", dist.group.WORLD, Link(), 1.25).layout


def test_uneven_nodes_refuse_hierarchical_and_auto_goes_flat():
    assert run_ranks(_uneven_nodes, 3) == [Layout(3, 1)] * 3


# the cost model, with no process ---------------------------------------------------------


@pytest.mark.parametrize("keep_factor", [1.0, 2.0, 3.5])
def test_every_flat_exchange_sends_what_all_gathering_each_workers_top_share_sends(keep_factor):
    """Ratio 0.01 with fp32 values and int32 indices: what each rank's top 1% sent to the W - 1 others costs, W% of
    dense DDP's bytes (2% at 2 workers, 8% at 8), whichever flat exchange spends it; never beyond the bucket."""
    numel = 4_000_000
    for name in ("allgather", "sharded"):
        for w in (2, 3, 8, 64):
            k = budget(0.01, numel, w)
            share = (
                cost(name, Layout(w), numel, k, keep_factor=keep_factor).bytes_sent
                / cost("dense", Layout(w), numel, k).bytes_sent
            )
            assert 0.00975 * w < share <= 0.01 * w * (1 + w / k), (name, w, share)
    assert budget(0.3, 1000, 8) == 1000 and budget(1e-9, 1000, 8) == 4
    # from 100 workers the entries cost the dense bucket: the hook sends it densely, and the model says so
    for name in ("allgather", "sharded", "hierarchical"):
        layout = Layout(128, 8)
        assert cost(name, layout, numel, budget(0.01, numel, 128)) == cost("dense", layout, numel, 0), name


def test_auto_is_allgather_up_to_four_workers_sharded_when_many_and_hierarchical_across_nodes():
    numel, k = 4_000_000, 40_000
    assert choose(Layout(2), numel, k) == "allgather" and choose(Layout(4), numel, k) == "allgather"
    assert choose(Layout(5), numel, k) == "sharded" and choose(Layout(8), numel, k) == "sharded"
    assert choose(Layout(64, 8), numel, k) == "hierarchical"
    assert choose(Layout(8, 8), numel, k) == "sharded"  # one node: no second level
    # beyond 4 ranks accuracy rules all-gather out, even where its fewer messages would be faster
    assert choose(Layout(8), 1000, 10, link=Link(inter_latency_us=1000)) == "sharded"
    assert accurate_exchanges(Layout(4)) == ("allgather",) and accurate_exchanges(Layout(5)) == ("sharded",)
    assert accurate_exchanges(Layout(4, 2)) == ("allgather", "hierarchical")
    assert accurate_exchanges(Layout(8, 4)) == ("sharded", "hierarchical")


def test_sharded_counts_give_each_destination_headroom():
    assert sharded_counts(40_000, 8, 1.25, keep_factor=1.0) == (6250, 5000)
    assert sharded_counts(40_000, 8, 1.25, keep_factor=3.0) == (6250, 15000)
    assert sharded_counts(3, 8, 1.25) == (1, 2)
    assert selected("sharded", 40_000, 8, 1.25, 3.0) == 18823 and selected("allgather", 40_000, 8) == 10_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exchange": "ring"}, "exchange: got 'ring'; allowed: auto, allgather, sharded, hierarchical"),
        ({"exchange": "sharded", "per_layer": True}, "exchange: got 'sharded' with per_layer: true; allowed"),
        ({"capacity_factor": 0.5}, r"capacity_factor: got 0.5; allowed: a number in \[1, inf\)"),
        ({"link": {"inter_gbps": 1}}, "link: not a compression option; allowed: capacity_factor"),
    ],
)
def test_bad_exchange_settings_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopKState(ratio=0.01, **kwargs)


def test_bad_link_figures_are_value_errors():
    with pytest.raises(ValueError, match="inter_gbps must be a finite number >= 0, got -1"):
        Link(inter_gbps=-1)
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        Link(intra_gbps=0)
    assert math.isclose(Link(inter_gbps=10, inter_latency_us=25).seconds(2, 1.25e9, inter=True), 1.0 + 50e-6)


def _generated_invariant(rank, world_size, algorithm, local_world_size, cases, value_dtype):
    """Hypothesis's cases on one group: what every rank got plus every residual is everything accumulated, exactly."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[value_dtype]
    _as_nodes(local_world_size)
    exchanger = Exchanger(algorithm, dist.group.WORLD, Link(), 1.0)
    sent_bytes = []
    for seed, (numel, k) in enumerate(cases):
        # Integers within +-60: exact in every value dtype, and so is a node's sum of two.
        g = torch.Generator().manual_seed(seed * 100 + rank)
        acc = torch.randint(-60, 61, (numel,), generator=g).float()
        total = _gather_all(acc).sum(0)
        out = torch.zeros_like(acc)
        future, sent, *_ = exchanger.run(algorithm, acc, k, dtype, out)
        future.wait()
        assert torch.equal(_gather_all(out), out.expand(world_size, -1)), "ranks got different updates"
        assert torch.equal(_gather_all(acc).sum(0) + out, total), f"lost mass at numel {numel}, k {k}"
        sent_bytes.append(sent)
    return sent_bytes


@st.composite
def _exchange_cases(draw):
    world_size, local_world_size = draw(st.sampled_from(LAYOUTS))
    algorithm = draw(st.sampled_from(["allgather", "sharded"] + (["hierarchical"] if local_world_size > 1 else [])))
    cases = draw(
        st.lists(
            st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), min_size=1, max_size=6
        )
    )
    return world_size, local_world_size, algorithm, cases, draw(st.sampled_from(["fp32", "fp16", "bf16"]))


@settings(max_examples=8, deadline=None, database=None, derandomize=True)
@given(_exchange_cases())
def test_generated_exchanges_lose_nothing_and_count_what_they_send(case):
    world_size, local_world_size, algorithm, cases, value_dtype = case
    sent = run_ranks(_generated_invariant, world_size, algorithm, local_world_size, cases, value_dtype)
    assert all(isinstance(b, (int, float)) and b >= 0 for rank in sent for b in rank)
    item = (
        torch.finfo({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[value_dtype]).bits // 8 + 4
    )
    if (
        algorithm == "allgather"
    ):  # every rank sends its selection, 2k / W entries (index and value), to each of the others
        assert [b for b in sent[0]] == [(world_size - 1) * max(1, 2 * k // world_size) * item for _, k in cases], (
            sent[0],
            cases,
        )
    if algorithm != "hierarchical":  # ratio's promise: 2k (W - 1) / W entries, up to one more per peer and stage
        for rank_sent in sent:
            assert all(
                b <= (2 * k / world_size + 2) * (world_size - 1) * item for b, (_, k) in zip(rank_sent, cases)
            ), (rank_sent, cases)


# behaviours a hand-made breakage once slipped past: each tested on its own ----------------


def _fp16_sums_keep_their_rounding(rank, world_size):
    """Non-integer floats in fp16: every owner's rounding of its sums stays in its residual, so nothing is lost."""
    g = torch.Generator().manual_seed(rank)
    acc = torch.randn(4000, generator=g) * (1 + rank)
    total = _gather_all(acc).sum(0)
    exchanger = Exchanger("sharded", dist.group.WORLD, Link(), 1.0)
    out = torch.zeros_like(acc)
    exchanger.run("sharded", acc, 300, torch.float16, out)[0].wait()
    lost = (_gather_all(acc).sum(0) + out - total).abs().max()
    # fp16 rounds these sums by about 1e-3; float32 sums in another order differ by about 1e-6
    assert lost < 1e-5, f"lost {float(lost)}: an owner's fp16 rounding of its sums went missing"
    rounded = out[out != 0]
    assert torch.equal(rounded, rounded.half().float()), "the update is not the fp16-rounded sums"
    return int((out != 0).sum())


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_fp16_sums_lose_nothing_to_rounding(world_size):
    assert all(count > 0 for count in run_ranks(_fp16_sums_keep_their_rounding, world_size))


def _owners_keep_the_largest_magnitudes(rank, world_size):
    """An all-negative bucket, every entry sent (room for all), owners keep 2 sums each: the most negative ones."""
    numel, k, keep = 60, 60, 2
    g = torch.Generator().manual_seed(rank)
    acc = -torch.rand(numel, generator=g) - 0.1
    total = _gather_all(acc).sum(0)
    out, _, _ = _run("sharded", acc, k, 1, capacity=numel, keep=keep)
    expected = torch.zeros(numel)
    for owner in range(world_size):
        mine = torch.arange(owner, numel, world_size)
        largest = mine[torch.topk(total[mine].abs(), keep).indices]
        expected[largest] = total[largest]
    assert torch.equal(out != 0, expected != 0), (torch.nonzero(out).reshape(-1), torch.nonzero(expected).reshape(-1))
    return True


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_owners_keep_the_sums_of_largest_magnitude(world_size):
    assert all(run_ranks(_owners_keep_the_largest_magnitudes, world_size))


def _odd_budget_on_two_levels(rank, world_size, local_world_size, k):
    """Disjoint large entries per node, so every selected entry is a distinct position of the update."""
    _as_nodes(local_world_size)
    numel, nodes, node = 1000, world_size // local_world_size, rank // local_world_size
    acc = torch.zeros(numel)
    acc[node::nodes] = torch.arange(numel // nodes, 0, -1).float() / (
        1 + rank % local_world_size
    )  # no ties within a node
    out, _, sent = _run("hierarchical", acc, k, local_world_size)
    modelled = cost("hierarchical", Layout(world_size, local_world_size), numel, k)
    shard_k = math.ceil(k / local_world_size)  # each local rank's share, rounded up
    per_shard = shard_k if nodes == 1 else selected("allgather" if nodes <= 2 else "sharded", shard_k, nodes)
    return (
        sent,
        modelled.bytes_sent,
        int((out != 0).sum()),
        local_world_size * nodes * per_shard if nodes <= 2 else None,
    )


@pytest.mark.parametrize("world_size, local_world_size, k", [(2, 2, 7), (4, 2, 7), (4, 2, 13), (6, 3, 11)])
def test_odd_budget_on_two_levels_sends_and_applies_what_the_cost_model_says(world_size, local_world_size, k):
    ranks = run_ranks(_odd_budget_on_two_levels, world_size, local_world_size, k)
    # ranks whose shard is shorter send more in the reduce-scatter; the model has the mean over ranks
    assert sum(sent for sent, _, _, _ in ranks) == pytest.approx(sum(modelled for _, modelled, _, _ in ranks))
    for _, _, entries, expected_entries in ranks:
        if expected_entries is not None:
            assert entries == expected_entries
