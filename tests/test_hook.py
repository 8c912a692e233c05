"""topk_hook on real gloo process groups with real DDP, against references written here."""

import copy
import dataclasses
import math
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk import TopKState, topk_hook
from raytopk.cost_model import KEEP_FACTOR

from ranks import run_ranks


def _model(seed=0, hidden=32, depth=1):
    """An MLP; with ``bucket_cap_mb=0.01`` each hidden layer of 64 or more fills a bucket of its own."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(16, hidden), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 4))


def _batch(rank, step, size=8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(size, 16, generator=g), torch.randint(0, 4, (size,), generator=g)


def _loss(model, rank, step):
    x, y = _batch(rank, step)
    return torch.nn.functional.cross_entropy(model(x), y)


_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _recording_hook(sizes):
    """topk_hook, recording each bucket's size: an independent view of DDP's buckets."""

    def hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
        sizes.append((state.iter, bucket.buffer().numel()))
        return topk_hook(state, bucket)

    return hook


# a ratio whose payload outweighs the bucket is plain DDP --------------------------------------------------------------


def _dense_ratio_vs_ddp(rank, world_size, ratio, value_dtype):
    plain, hooked = DDP(_model()), DDP(_model())
    state = TopKState(ratio=ratio, start_iter=0, value_dtype=value_dtype, module=hooked.module)
    hooked.register_comm_hook(state, topk_hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, hooked)]
    for step in range(4):
        for model, opt in zip((plain, hooked), opts):
            opt.zero_grad()
            _loss(model, rank, step).backward()
        torch.testing.assert_close(_flat_grad(hooked), _flat_grad(plain), rtol=1e-6, atol=1e-7)
        for opt in opts:
            opt.step()
    return state.stats


@pytest.mark.parametrize("ratio, value_dtype", [(1.0, "fp32"), (0.7, "fp16")])
def test_a_ratio_whose_payload_outweighs_the_bucket_is_plain_ddp_on_the_wire(ratio, value_dtype):
    """At ratio 1.0, or 0.7 with fp16 values (6 bytes an entry against 4), indices and values would cost more than the
    bucket: the hook allreduces it densely, as DDP does, and counts exactly DDP's bytes."""
    for stats in run_ranks(_dense_ratio_vs_ddp, 2, ratio, value_dtype):
        assert stats["steps"] == 4 and stats["bytes_sent"] == stats["dense_bytes"] > 0, stats


def _memory_of(state, model):
    """Residuals and velocities, flat in parameter order (zeros before the first step)."""
    saved = state.state_dict()
    return {
        kind: torch.cat(
            [saved[kind].get(name, torch.zeros_like(p)).reshape(-1) for name, p in model.named_parameters()]
        )
        for kind in ("residuals", "velocities")
    }


def _dense_fallback_memory(rank, world_size):
    """Momentum correction at ratio 0.01, then the same state at ratio 1.0 (the dense fallback), with a non-finite step
    on rank 0 in each mode: a non-finite step keeps the residual and the velocity; a finite dense step sends
    gradient + residual + momentum * velocity and empties both."""
    model = _model()
    local = copy.deepcopy(model)  # this rank's own gradient; no optimizer steps, so the weights stay equal
    ddp = DDP(model)
    state = TopKState(ratio=0.01, start_iter=0, momentum=0.9, module=model)
    ddp.register_comm_hook(state, topk_hook)
    for step, ratio, poisoned in [(0, 0.01, False), (1, 0.01, True), (2, 1.0, True), (3, 1.0, False)]:
        state.options = dataclasses.replace(state.options, ratio=ratio)
        before = _memory_of(state, model)
        ddp.zero_grad()
        loss = _loss(ddp, rank, step)
        (loss * float("inf") if poisoned and rank == 0 else loss).backward()
        after = _memory_of(state, model)
        if poisoned:
            assert not bool(torch.isfinite(_flat_grad(model)).all())
            assert all(torch.equal(before[kind], after[kind]) for kind in before), f"step {step} changed the memory"
        elif step == 0:
            assert bool(after["residuals"].abs().sum() > 0) and bool(after["velocities"].abs().sum() > 0)
    local.zero_grad()
    _loss(local, rank, 3).backward()
    sent = _flat_grad(local) + before["residuals"] + 0.9 * before["velocities"]  # u = m u + g, then u + residual
    dist.all_reduce(sent)
    torch.testing.assert_close(_flat_grad(model), sent / world_size, rtol=1e-5, atol=1e-6)
    assert not bool(after["residuals"].any()) and not bool(after["velocities"].any()), (
        "the dense step left memory behind"
    )
    return True


def test_the_dense_fallback_empties_the_memory_and_a_non_finite_step_keeps_it():
    assert run_ranks(_dense_fallback_memory, 2) == [True, True]


# the applied gradient is the mean of each rank's top-k of (gradient + residual) -------


def _reference_ratio(step, ratio, start_iter, warmup_ratio=None, warmup_steps=0, **_):
    """DGC's exponential warm-up, written out: warmup_ratio * (ratio / warmup_ratio) ** (t / T)."""
    done = step - start_iter
    if warmup_ratio is None or done >= warmup_steps:
        return ratio
    return warmup_ratio * (ratio / warmup_ratio) ** (done / warmup_steps)


def _budget(ratio, numel, world_size):
    """The budget, written out: what all-gathering each rank's top ``ceil(ratio * numel)`` sends, as entries ``k`` with
    ``2 k (W - 1) / W`` sent per rank: ``k = x W / 2`` beyond two ranks, rounded up, at most ``numel``."""
    x = max(1, math.ceil(ratio * numel))
    return min(numel, x if world_size <= 2 else math.ceil(x * world_size / 2))


def _allgather_k(budget, world_size):
    """What all-gather selects per rank of a budget: 2k / W (k itself on one rank, with no one to send to)."""
    return budget if world_size == 1 else max(1, 2 * budget // world_size)


def _sharded_reference(accs, s, keep_factor, capacity_factor=1.25):
    """The sharded exchange written out for every rank at once:
    ``(update sum, positions each rank's entry was used at)``.

    Each rank selects its top ``s``; index ``i`` goes to owner ``i % W`` (each
    owner's ``ceil(capacity_factor * s / W)`` largest per sender); owners sum
    and keep their ``ceil(keep_factor * s / W)`` sums of largest magnitude.
    """
    world_size, n = accs.shape
    capacity, keep = math.ceil(capacity_factor * s / world_size), math.ceil(keep_factor * s / world_size)
    routed = []
    for acc in accs:
        chosen = torch.topk(acc.abs(), s).indices
        fits = [
            c
            for o in range(world_size)
            for c in sorted(chosen[chosen % world_size == o].tolist(), key=lambda i: -abs(acc[i]))[:capacity]
        ]
        routed.append(torch.tensor(fits, dtype=torch.long))
    sums = torch.zeros(n)
    for acc, fits in zip(accs, routed):
        sums[fits] += acc[fits]
    received = torch.zeros(n, dtype=torch.bool)
    for fits in routed:
        received[fits] = True
    kept = torch.zeros(n, dtype=torch.bool)
    for o in range(world_size):
        mine = torch.nonzero(received & (torch.arange(n) % world_size == o)).reshape(-1)
        kept[mine[torch.topk(sums[mine].abs(), min(keep, len(mine))).indices]] = True
    return torch.where(kept, sums, torch.zeros(n)), [fits[kept[fits]] for fits in routed]


def _against_reference(rank, world_size, ratio, value_dtype, start_iter, options):
    """Six steps of DDP with the hook against a reference computed here from every rank's own gradient.

    The reference follows the algorithm as published: clip (local, to the
    norm over sqrt(W)), momentum correction u = m u + g, accumulate, top-k per
    bucket or per parameter (1-D and small parameters whole), momentum factor
    masking, error feedback. All-gather selects ``2k / W`` of the budget ``k``
    per rank; with ``exchange="sharded"``, :func:`_sharded_reference` decides
    what is used, and so which velocities are masked.
    """
    options = {"exchange": "allgather", **options}
    model = _model(hidden=24)
    local = copy.deepcopy(model)  # computes this rank's own gradient, no DDP
    ddp = DDP(model)
    sizes, orders = [], []  # each step's bucket size, and which parameters it holds in what order (DDP reorders them)
    recording = _recording_hook(sizes)
    place = {p: i for i, p in enumerate(model.parameters())}

    def hook(state, bucket):
        orders.append([place[p] for p in bucket.parameters()])
        return recording(state, bucket)

    ddp.register_comm_hook(TopKState(ratio=ratio, start_iter=start_iter, value_dtype=value_dtype, **options), hook)
    shapes = [p.shape for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    spans, start = [], 0
    for shape in shapes:
        spans.append(
            (start, start + shape.numel(), len(shape) <= 1 or shape.numel() < options.get("dense_below", 1024))
        )
        start += shape.numel()
    momentum, clip = options.get("momentum", 0.0), options.get("clip_norm")
    residuals, velocities = torch.zeros(world_size, n), torch.zeros(world_size, n)
    for step in range(6):
        ddp.zero_grad()
        _loss(ddp, rank, step).backward()
        local.zero_grad()
        _loss(local, rank, step).backward()
        grads = [torch.empty(n) for _ in range(world_size)]
        dist.all_gather(grads, _flat_grad(local))
        if step < start_iter:
            expected = torch.stack(grads).mean(0)
        else:
            expected = torch.zeros(n)
            current = _reference_ratio(step, ratio, start_iter, **options)
            budget = _budget(current, n, world_size)
            accs = []
            for r in range(world_size):
                g = grads[r]
                if clip is not None:
                    g = g * min(1.0, clip / math.sqrt(world_size) / float(g.norm()))
                if momentum:
                    velocities[r] = momentum * velocities[r] + g
                    g = velocities[r]
                acc = g + residuals[r]
                accs.append(acc)
                if options["exchange"] == "sharded":
                    continue
                if options.get("per_layer"):
                    chosen = torch.cat(
                        [
                            torch.arange(lo, hi)
                            if dense
                            else lo
                            + torch.topk(
                                acc[lo:hi].abs(), _allgather_k(_budget(current, hi - lo, world_size), world_size)
                            ).indices
                            for lo, hi, dense in spans
                        ]
                    )
                else:
                    chosen = torch.topk(acc.abs(), _allgather_k(budget, world_size)).indices
                sent = torch.zeros(n)
                sent[chosen] = acc[chosen].to(_TORCH_DTYPES[value_dtype]).float()
                residuals[r] = acc - sent  # zero where sent, but for fp16/bf16 rounding
                velocities[r][chosen] = 0.0  # momentum factor masking
                expected += sent
            if options["exchange"] == "sharded":  # owners by position in the bucket, as DDP laid it out this step
                in_bucket = torch.cat([torch.arange(*spans[i][:2]) for i in orders[-1]])
                chosen = max(1, math.floor(2 * budget / (1.25 + KEEP_FACTOR)))
                expected, used = _sharded_reference(torch.stack(accs)[:, in_bucket], chosen, KEEP_FACTOR)
                expected = torch.zeros(n).index_put_((in_bucket,), expected)
                used = [in_bucket[positions] for positions in used]
                for r, positions in enumerate(used):
                    residuals[r] = accs[r].clone()
                    residuals[r][positions] = 0.0
                    velocities[r][positions] = 0.0  # masked where, and only where, the entry reached the update
            expected /= world_size
        torch.testing.assert_close(_flat_grad(model), expected, rtol=1e-5, atol=1e-6)
    assert len(sizes) == 6 and {size for _, size in sizes} == {n}, "the reference assumes one bucket"
    return True


@pytest.mark.parametrize(
    "world_size, ratio, value_dtype, start_iter, options",
    [
        (2, 0.01, "fp32", 0, {}),
        (3, 0.05, "fp32", 2, {}),
        (2, 0.02, "fp16", 1, {}),
        (2, 0.02, "bf16", 0, {}),
        (1, 0.1, "fp32", 0, {}),
        (2, 0.01, "fp32", 1, {"warmup_ratio": 0.25, "warmup_steps": 3}),
        (2, 0.02, "fp32", 0, {"momentum": 0.9}),
        (3, 0.02, "fp32", 0, {"clip_norm": 0.05}),
        (2, 0.05, "fp32", 0, {"per_layer": True, "dense_below": 100}),
        (2, 0.5, "fp16", 0, {"per_layer": True}),  # every parameter small: all dense, as fp16 values
        (
            2,
            0.01,
            "fp16",
            1,
            {
                "warmup_ratio": 0.3,
                "warmup_steps": 2,
                "momentum": 0.5,
                "clip_norm": 0.1,
                "per_layer": True,
                "dense_below": 100,
            },
        ),
        # The sharded exchange, where owners keep fewer sums than they receive: momentum correction masks the
        # velocity exactly where a rank's entry reached the update.
        (3, 0.05, "fp32", 0, {"exchange": "sharded", "momentum": 0.9}),
        (4, 0.1, "fp32", 1, {"exchange": "sharded", "momentum": 0.9, "clip_norm": 0.5}),
    ],
)
def test_applied_gradient_matches_independent_reference(world_size, ratio, value_dtype, start_iter, options):
    assert run_ranks(_against_reference, world_size, ratio, value_dtype, start_iter, options) == [True] * world_size


def _on_a_subgroup(rank, world_size, members):
    """DDP and the hook on a subgroup of the ranks (not starting at 0), against the reference over that subgroup."""
    group = dist.new_group(members)  # every rank takes part in making it
    if rank not in members:
        return None
    model = _model(hidden=24)
    local = copy.deepcopy(model)
    ddp = DDP(model, process_group=group)
    ddp.register_comm_hook(TopKState(ratio=0.05, start_iter=0, process_group=group), topk_hook)
    n = sum(p.numel() for p in model.parameters())
    residuals = torch.zeros(len(members), n)
    for step in range(4):
        local.zero_grad()
        _loss(local, rank, step).backward()
        grads = [torch.empty(n) for _ in members]
        dist.all_gather(grads, _flat_grad(local), group=group)
        expected = torch.zeros(n)
        for i, grad in enumerate(grads):
            acc = grad + residuals[i]
            chosen = torch.topk(acc.abs(), math.ceil(0.05 * n)).indices
            expected[chosen] += acc[chosen]
            residuals[i] = acc
            residuals[i][chosen] = 0
        ddp.zero_grad()
        _loss(ddp, rank, step).backward()
        torch.testing.assert_close(_flat_grad(model), expected / len(members), rtol=1e-5, atol=1e-6)
    return True


def test_the_hook_exchanges_within_its_process_group():
    """Three ranks; DDP and the hook on ranks 0 and 2 only. A hook that used the default group would wait for rank 1,
    and one that divided by the default group's size would apply two thirds of the mean."""
    assert run_ranks(_on_a_subgroup, 3, [0, 2], timeout=120) == [True, None, True]


def test_warmup_ratio_decays_exponentially_to_the_target():
    state = TopKState(ratio=0.001, start_iter=2, warmup_ratio=0.25, warmup_steps=4)
    ratios = []
    for state.iter in range(2, 8):
        ratios.append(state.current_ratio())
    expected = [0.25, 0.25 * 0.004**0.25, 0.25 * 0.004**0.5, 0.25 * 0.004**0.75, 0.001, 0.001]
    assert ratios == pytest.approx(expected, rel=1e-12)
    assert [state.k_for(1_000_000, w) for w in (1, 2, 3, 8)] == [1000, 1000, 1500, 4000]


# error feedback conserves mass, over many buckets -------------------------------------


def _residual_sum(state, model):
    residuals = state.state_dict()["residuals"]
    return torch.cat([residuals[name].reshape(-1) for name, _ in model.named_parameters()])


def _train_and_balance(rank, world_size, model, cap_mb, steps, **options):
    """DDP with the hook for ``steps``; return ``(applied + mean residual, sum of the mean gradients, residual sum,
    bucket sizes, state)``: error feedback conserves mass when the first two are equal."""
    local = copy.deepcopy(model)  # this rank's own gradient, no DDP
    ddp = DDP(model, bucket_cap_mb=cap_mb)
    sizes = []
    state = TopKState(module=model, **options)
    ddp.register_comm_hook(state, _recording_hook(sizes))
    n = sum(p.numel() for p in model.parameters())
    applied, mean_grads = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step in range(steps):
        local.zero_grad()
        _loss(local, rank, step).backward()
        grad = _flat_grad(local)
        dist.all_reduce(grad)
        mean_grads += grad.double() / world_size
        ddp.zero_grad()
        _loss(ddp, rank, step).backward()
        applied += _flat_grad(model).double()
    residual = _residual_sum(state, model)
    dist.all_reduce(residual)
    return applied + residual.double() / world_size, mean_grads, residual, sizes, state


def _mass_conservation(rank, world_size):
    balance, mean_grads, residual, sizes, _ = _train_and_balance(
        rank, world_size, _model(hidden=64, depth=4), 0.01, 8, ratio=0.01, start_iter=1
    )
    torch.testing.assert_close(balance, mean_grads, rtol=1e-5, atol=1e-6)
    assert residual.abs().sum() > 0, "nothing was held back: the test did not exercise compression"
    buckets_per_step = sum(1 for it, _ in sizes if it == 5)
    return buckets_per_step


def test_error_feedback_conserves_mass_across_buckets():
    buckets = run_ranks(_mass_conservation, 2)
    assert buckets[0] >= 3, f"expected several buckets, got {buckets[0]}"


def _generated_training(rank, world_size, hidden, depth, cap_mb, options):
    """Hypothesis's case through DDP: mass is conserved, and all-gather's bytes are counted exactly, bucket by
    bucket."""
    model = _model(seed=hidden, hidden=hidden, depth=depth)
    balance, mean_grads, _, sizes, state = _train_and_balance(rank, world_size, model, cap_mb, 5, **options)
    tolerance = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}[options["value_dtype"]]
    torch.testing.assert_close(balance, mean_grads, rtol=tolerance, atol=tolerance)
    return sizes, state.stats, dict(state.algorithms)


@st.composite
def _training_cases(draw):
    world_size = draw(st.integers(2, 4))
    options = {
        "ratio": draw(st.sampled_from([0.001, 0.01, 0.05, 0.3, 0.9, 1.0])),
        "start_iter": draw(st.integers(0, 3)),
        "value_dtype": draw(st.sampled_from(["fp32", "fp16", "bf16"])),
        "per_layer": draw(st.booleans()),
        "dense_below": draw(st.sampled_from([0, 100, 1024])),
    }
    options["exchange"] = draw(st.sampled_from(["allgather", "auto"] + ([] if options["per_layer"] else ["sharded"])))
    if draw(st.booleans()):
        options.update(warmup_ratio=draw(st.sampled_from([0.25, 1.0])), warmup_steps=draw(st.integers(1, 3)))
    return (
        world_size,
        draw(st.sampled_from([16, 40, 64])),
        draw(st.integers(0, 3)),
        draw(st.sampled_from([0.001, 0.01, 25])),
        options,
    )


@settings(max_examples=10, deadline=None, database=None, derandomize=True)
@given(_training_cases())
def test_generated_training_conserves_mass_and_counts_allgather_bytes(case):
    """Random models, bucket caps, world sizes 2-4, ratios (to 1.0, where the bucket goes dense), value dtypes, warm-ups
    and DGC's per-layer selection, through real DDP: what was applied plus every residual is the sum of the mean
    gradients, and a plain all-gather run counts, per bucket, W - 1 payloads of 2k / W indices and values."""
    world_size, hidden, depth, cap_mb, options = case
    sizes, stats, algorithms = run_ranks(_generated_training, world_size, hidden, depth, cap_mb, options)[0]
    assert stats["steps"] == 5 and stats["bytes_sent"] <= stats["dense_bytes"] or options["per_layer"], stats
    if options["exchange"] == "allgather" and not options["per_layer"]:
        item = {"fp32": 4, "fp16": 2, "bf16": 2}[options["value_dtype"]] + 4
        expected = 0
        for step, numel in sizes:
            ring = int(2 * (world_size - 1) / world_size * numel * 4)
            ratio = _reference_ratio(step, **options)
            k = _budget(ratio, numel, world_size)
            sparse = (world_size - 1) * _allgather_k(k, world_size) * item  # each rank's top ceil(ratio * numel)
            expected += ring if step < options["start_iter"] or k * item >= numel * 4 else sparse
        assert stats["bytes_sent"] == expected, (stats, sizes)
        assert set(algorithms) <= {"allgather"}


# exact resume through state_dict ------------------------------------------------------


def _train(rank, steps, first_step, cap_mb, saved=None, options=None, hook=topk_hook):
    """SGD steps with the hook; optionally resume from ``saved``; return weights and a save point."""
    options = options or {}
    model = _model(hidden=64, depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if options.get("momentum") else 0.9)
    state = TopKState(**{"ratio": 0.01, "start_iter": 2, "module": model, **options})
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["hook"])
    ddp = DDP(model, bucket_cap_mb=cap_mb)
    ddp.register_comm_hook(state, hook)
    checkpoint = None
    for step in range(first_step, first_step + steps):
        opt.zero_grad()
        _loss(ddp, rank, step).backward()
        opt.step()
        if step == 3:
            checkpoint = {
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()),
                "hook": state.state_dict(),
            }
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return weights, checkpoint, state


def _resume(rank, world_size, resume_cap_mb, options=None):
    straight, checkpoint, straight_state = _train(rank, 8, 0, cap_mb=0.01, options=options)
    # A new model, optimizer, DDP and state, loaded from the step-3 checkpoint.
    model = _model(hidden=64, depth=4)
    state = TopKState(**{"ratio": 0.01, "start_iter": 2, "module": model, **(options or {})})
    state.load_state_dict(checkpoint["hook"])
    restored = state.state_dict()
    for kind in ("residuals", "velocities"):
        assert restored[kind].keys() == checkpoint["hook"][kind].keys()
        for name, saved in checkpoint["hook"][kind].items():
            assert torch.equal(restored[kind][name], saved), name
    assert restored["iter"] == 4 and restored["stats"] == checkpoint["hook"]["stats"]
    bytes_at_save = checkpoint["hook"]["stats"]["bytes_sent"]

    resumed, _, resumed_state = _train(rank, 4, 4, cap_mb=resume_cap_mb, saved=checkpoint, options=options)
    assert resumed_state.iter == straight_state.iter == 8
    sent_after_resume = resumed_state.stats["bytes_sent"] - bytes_at_save
    dense_after_resume = resumed_state.stats["dense_bytes"] - checkpoint["hook"]["stats"]["dense_bytes"]
    assert sent_after_resume < 0.05 * dense_after_resume, "the resumed run warmed up densely again"
    return bool(torch.equal(resumed, straight)), float((resumed - straight).abs().max())


def test_resume_continues_exactly_as_the_uninterrupted_run():
    for equal, diff in run_ranks(_resume, 2, 0.01):
        assert equal, f"resumed weights differ by up to {diff}"


def test_resume_with_momentum_correction_and_per_layer_selection_is_exact():
    # Velocities are saved by parameter like residuals; per-layer groups do not depend on buckets.
    options = {"momentum": 0.9, "per_layer": True, "dense_below": 100, "warmup_ratio": 0.2, "warmup_steps": 2}
    for equal, diff in run_ranks(_resume, 2, 0.2, options):
        assert equal, f"resumed weights differ by up to {diff}"


def test_resume_with_another_bucket_cap_restores_every_residual():
    # Bucket membership changes which entries each bucket's top-k picks, so the
    # weights may drift apart; the residuals, step count and stats are restored exactly.
    for equal, diff in run_ranks(_resume, 2, 0.2):
        assert diff < 1e-2


# stats count the real payload ----------------------------------------------------------


def _stats(rank, world_size, value_dtype):
    model = _model(hidden=64, depth=4)
    ddp = DDP(model, bucket_cap_mb=0.01)
    sizes = []
    state = TopKState(ratio=0.01, start_iter=2, value_dtype=value_dtype, exchange="allgather")
    ddp.register_comm_hook(state, _recording_hook(sizes))
    for step in range(5):
        ddp.zero_grad()
        _loss(ddp, rank, step).backward()
    value_bytes = {"fp32": 4, "fp16": 2}[value_dtype]
    ring = 2 * (world_size - 1) / world_size  # of the bucket, per rank, in a ring allreduce
    dense = [int(ring * n * 4) for _, n in sizes]
    # a ring all-gather: each rank passes on the W - 1 payloads of the others, each rank's top ceil(ratio * n)
    expected_sent = sum(
        d if it < 2 else (world_size - 1) * math.ceil(0.01 * n) * (value_bytes + 4) for (it, n), d in zip(sizes, dense)
    )
    assert state.stats["bytes_sent"] == expected_sent
    assert state.stats["dense_bytes"] == sum(dense)
    assert sum(n for _, n in sizes) == 5 * sum(p.numel() for p in model.parameters())
    assert state.stats["steps"] == 5 and state.stats["hook_s"] > 0
    return True


@pytest.mark.parametrize("value_dtype, world_size", [("fp32", 2), ("fp16", 2), ("fp32", 3)])
def test_stats_count_wire_bytes(value_dtype, world_size):
    assert run_ranks(_stats, world_size, value_dtype) == [True] * world_size


# non-finite gradients pass through and leave residuals alone ----------------------------


def _non_finite(rank, world_size):
    model = _model()
    ddp = DDP(model)
    state = TopKState(ratio=0.05, start_iter=0, module=model)
    ddp.register_comm_hook(state, topk_hook)
    scaler_skips = []
    for step in range(4):
        before = {k: v.clone() for k, v in state.state_dict()["residuals"].items()}
        ddp.zero_grad()
        loss = _loss(ddp, rank, step)
        if step == 2 and rank == 0:
            loss = loss * float("inf")  # an fp16-style overflow on one rank only
        loss.backward()
        finite = bool(torch.isfinite(_flat_grad(model)).all())
        scaler_skips.append(not finite)
        after = state.state_dict()["residuals"]
        if step == 2:  # every rank keeps its residual: the step never happened
            assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step changed the residual"
        else:
            assert all(bool(torch.isfinite(v).all()) for v in after.values())
    return scaler_skips


def _amp_overflow(rank, world_size):
    """bf16 autocast and a GradScaler whose first scales overflow: skipped steps change neither residuals nor
    weights."""
    model = _model()
    ddp = DDP(model)
    state = TopKState(ratio=0.05, start_iter=0, module=model)
    ddp.register_comm_hook(state, topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    skipped = []
    for step in range(9):
        residuals = {k: v.clone() for k, v in state.state_dict()["residuals"].items()}
        weights = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = 16 * _loss(ddp, rank, step)  # a loss weight: scale * loss passes the fp32 range at first
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skip = scaler.get_scale() < scale
        skipped.append(skip)
        after = state.state_dict()["residuals"]
        same_weights = all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
        if skip:
            assert same_weights and all(torch.equal(residuals[k], after[k]) for k in residuals), (
                f"skipped step {step} changed state"
            )
        else:
            assert not same_weights and all(bool(torch.isfinite(v).all()) for v in after.values())
    return skipped


def test_amp_overflow_steps_are_skipped_and_leave_residuals_untouched():
    for skipped in run_ranks(_amp_overflow, 2):
        assert skipped[0] and not skipped[-1], f"expected early overflows, then steps: {skipped}"


def test_non_finite_step_is_skipped_on_every_rank_and_spares_the_residual():
    for skips in run_ranks(_non_finite, 2):
        assert skips == [False, False, True, False]


@pytest.mark.parametrize("finite", [True, False])
def test_a_finite_flag_left_on_the_device_commits_as_the_bool_does(finite):
    """On a GPU the hook keeps the finite check a 0-dim tensor (the host never waits for it); the memory ends the
    same."""
    from raytopk.options import CompressionOptions
    from raytopk.residuals import BucketMemory, ResidualStore

    params = (torch.nn.Parameter(torch.zeros(40)), torch.nn.Parameter(torch.zeros(3, 8)))
    options = CompressionOptions(ratio=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    memories = [BucketMemory(params, torch.zeros(64), ResidualStore(), options) for _ in range(2)]
    for flat in ("residual", "spare", "velocity", "velocity_spare"):
        values = torch.randn(64, generator=generator)
        for memory in memories:
            getattr(memory, flat).copy_(values)
    cleared = torch.tensor([0, 5, 63])
    memories[0].commit(cleared, finite)
    memories[1].commit(cleared, torch.tensor(finite))
    for flat in ("residual", "velocity"):
        assert torch.equal(getattr(memories[0], flat), getattr(memories[1], flat)), flat
    assert bool(memories[0].velocity[cleared].eq(0).all()) == finite


# a peer that dies -------------------------------------------------------------------------


def _peer_dies_inside_the_exchange(rank, world_size):
    """Rank 1 posts its first bucket's exchange of step 1 and ends its process there (``os._exit``, as a killed
    worker ends); rank 0, inside the same step's exchanges, must get an error, not wait."""
    model = DDP(_model(hidden=64, depth=4), bucket_cap_mb=0.01)
    state = TopKState(ratio=0.1, start_iter=0, module=model.module)

    def hook(state, bucket):
        step = state.iter
        future = topk_hook(state, bucket)
        if rank == 1 and step == 1 and bucket.index() == 0:
            os._exit(0)  # no clean-up, no goodbye to the peers
        return future

    model.register_comm_hook(state, hook)
    _loss(model, rank, 0).backward()
    started = time.monotonic()
    try:
        _loss(model, rank, 1).backward()
    except RuntimeError as err:  # gloo's error, raised through DDP's backward
        return str(err).splitlines()[0], time.monotonic() - started
    return "no error", time.monotonic() - started


def test_a_peer_that_dies_inside_the_hook_is_an_error_on_the_others_not_a_hang():
    message, seconds = run_ranks(_peer_dies_inside_the_exchange, 2, timeout=120, dying=(1,))[0]
    assert re.search("Connection (closed|reset) by peer", message) and seconds < 10, (message, seconds)


# settings are checked ------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_bad_ratio_names_value_and_range(ratio):
    with pytest.raises(ValueError, match=r"^ratio: got .*; allowed: a number"):
        TopKState(ratio=ratio)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start_iter": -1},
        {"start_iter": 1.5},
        {"value_dtype": "int8"},
        {"warmup_ratio": 0},
        {"warmup_ratio": 2.0},
        {"warmup_steps": 3},
        {"warmup_steps": -1},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"clip_norm": 0},
        {"clip_norm": float("inf")},
        {"per_layer": "yes"},
        {"dense_below": -5},
    ],
)
def test_bad_settings_are_value_errors(kwargs):
    with pytest.raises(ValueError, match="got"):
        TopKState(ratio=0.01, **kwargs)


def test_resume_without_module_continues_exactly():
    """``TopKState`` without ``module=``, as PowerSGD's state is written: residuals are named by the order DDP
    first hands parameters to the hook, saved mid-run and loaded into a new model, DDP and state."""
    for equal, diff in run_ranks(_resume, 2, 0.01, {"module": None}):
        assert equal, f"resumed weights differ by up to {diff}"


def test_resume_without_module_under_another_bucket_cap_restores_every_residual():
    # DDP's first buckets hold the parameters in reverse registration order whatever bucket_cap_mb, so the names hold.
    for equal, diff in run_ranks(_resume, 2, 0.2, {"module": None}):
        assert diff < 1e-2


def _load_into_another_model(rank, world_size):
    _, checkpoint, _ = _train(rank, 4, 0, cap_mb=0.01, options={"module": None})
    assert set(checkpoint["hook"]["residuals"]) == {f"param{i}" for i in range(len(checkpoint["model"]))}
    model = _model(hidden=48, depth=4)
    state = TopKState(ratio=0.01, start_iter=2)
    state.load_state_dict(checkpoint["hook"])
    ddp = DDP(model, bucket_cap_mb=0.01)
    ddp.register_comm_hook(state, topk_hook)
    try:
        _loss(ddp, rank, 4).backward()
    except Exception as err:  # raised in the hook, surfaced by backward()
        return str(err)
    return "trained"


def test_a_module_less_checkpoint_of_another_model_is_refused_at_the_first_step():
    for message in run_ranks(_load_into_another_model, 2):
        assert "checkpoint residual param0 has shape" in message and "give TopKState module=" in message, message


def test_a_checkpoint_naming_parameters_the_model_lacks_is_refused_at_load():
    model = _model()
    saved = TopKState(ratio=0.01, module=model).state_dict()
    saved["residuals"] = {"0.weight": torch.zeros(32, 16), "encoder.gone.weight": torch.zeros(3)}
    saved["buckets"] = [["0.weight", "encoder.gone.weight"]]
    with pytest.raises(
        ValueError, match=r"residuals for parameters this model does not have: \['encoder.gone.weight'\]"
    ):
        TopKState(ratio=0.01, module=_model()).load_state_dict(saved)
