"""The C kernels give the PyTorch path's results bit for bit, build where a compiler is, and step aside where none
is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raytopk import TopKState, kernels, topk_hook
from raytopk.compression import accumulate_topk, pack, select_topk

from ranks import run_ranks

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the C kernels could not be built here")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by their bits, so NaN equals NaN and -0.0 differs from 0.0."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _without_kernels(monkeypatch, fn, *args):
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "library", lambda: None)
        return fn(*args)


def _tensors():
    """Buckets of the sizes and shapes where the two paths could part: ties, zeros, non-finite values, odd lengths."""
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-4, 5, (100_003,), generator=g).float() / 8  # most magnitudes shared by thousands
    mostly_zero = torch.where(torch.rand(421_642, generator=g) < 0.997, 0.0, torch.randn(421_642, generator=g))
    non_finite = torch.randn(65_537, generator=g)
    non_finite[[5, 700, 65_536]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    signed_zeros = torch.where(torch.rand(40_000, generator=g) < 0.5, -0.0, 0.0)
    signed_zeros[::997] = torch.randn(len(signed_zeros[::997]), generator=g)
    return {
        "normal": torch.randn(421_642, generator=g),
        "heavy tails": torch.randn(262_147, generator=g) ** 5,
        "ties": ties,
        "mostly zero": mostly_zero,
        "non-finite": non_finite,
        "signed zeros": signed_zeros,
        "small": torch.randn(5_000, generator=g),
    }


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05])
def test_selection_is_bit_identical_with_and_without_kernels(name, fraction, monkeypatch):
    x = _tensors()[name]
    k = max(1, int(fraction * x.numel()))
    with_kernels = select_topk(x, k)
    without = _without_kernels(monkeypatch, select_topk, x, k)
    for ours, theirs in zip(with_kernels, without):
        assert torch.equal(_bits(ours), _bits(theirs))
    values, indices = with_kernels
    assert len(set(indices.tolist())) == k
    magnitudes = values.abs().nan_to_num(nan=float("inf")).sort().values
    assert torch.equal(magnitudes, torch.topk(x.abs().nan_to_num(nan=float("inf")), k).values.sort().values)


@pytest.mark.parametrize("name", ["normal", "ties", "mostly zero", "non-finite", "small"])
def test_accumulate_topk_is_bit_identical_with_and_without_kernels(name, monkeypatch):
    grad = _tensors()[name]
    residual = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(1)) * (name != "mostly zero") / 4
    k = max(1, grad.numel() // 100)
    runs = []
    for use in (True, False):
        g, acc = grad.clone(), torch.empty_like(grad)
        selected = (
            accumulate_topk(g, residual, acc, k)
            if use
            else _without_kernels(monkeypatch, accumulate_topk, g, residual, acc, k)
        )
        runs.append((g, acc, *selected))
    for ours, theirs in zip(*runs):
        assert torch.equal(_bits(ours), _bits(theirs))
    assert not runs[0][0].any(), "the bucket must be zeroed: the update is added into it"
    assert torch.equal(_bits(runs[0][1]), _bits(grad + residual))


def test_accumulate_topk_writes_its_entries_as_the_payload_pack_returns():
    grad, residual = _tensors()["normal"], torch.zeros(421_642)
    values, indices = accumulate_topk(grad.clone(), residual, torch.empty_like(grad), 4_217)
    assert pack(values, indices, torch.float32).data_ptr() == indices.data_ptr(), (
        "packing the kernel's result copies nothing"
    )


def test_decoding_kernels_match_index_add_and_isfinite():
    g = torch.Generator().manual_seed(2)
    out, acc = torch.randn(50_000, generator=g), torch.randn(50_000, generator=g)
    peers = [(torch.randn(3_000, generator=g), torch.randperm(50_000, generator=g)[:3_000].int()) for _ in range(3)]
    rows = torch.stack([pack(values, indices, torch.float32) for values, indices in peers])
    expected = out.clone()
    for values, indices in peers:
        expected.index_add_(0, indices.long(), values, alpha=1 / 3)
    touched = kernels.scatter_add_rows(out, rows, 3_000, 1 / 3)
    assert torch.equal(_bits(out), _bits(expected))
    assert torch.equal(touched, torch.cat([indices for _, indices in peers]))
    assert kernels.finite_at(out, touched)
    out[touched[7_234]] = float("inf")
    assert not kernels.finite_at(out, touched)
    indices = peers[0][1]
    acc[indices[7]] = float("nan")
    expected = acc.clone().index_copy_(0, indices.long(), acc[indices.long()] - acc[indices.long()])
    kernels.clear_at(acc, indices)
    assert torch.equal(_bits(acc), _bits(expected))


def _build(tmp_path, **env):
    """Build (or not) in a fresh process and cache; what it printed, and whether the kernels loaded."""
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch; from raytopk import kernels; from raytopk.compression import select_topk\n"
        "x = torch.randn(100_000); v, i = select_topk(x, 1_000)\n"
        "assert set(i.tolist()) == set(torch.topk(x.abs(), 1_000).indices.tolist())\n"
        "print('loaded' if kernels.library() else 'not loaded')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def _libraries(directory):
    return sorted(directory.glob("*.so")) if directory.exists() else []


def test_kernels_are_built_once_into_the_cache(tmp_path):
    assert "loaded" in _build(tmp_path)
    built = _libraries(tmp_path / "raytopk" / "kernels")
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "not loaded" not in _build(tmp_path)
    assert [p.stat().st_mtime_ns for p in _libraries(tmp_path / "raytopk" / "kernels")] == [stamp]


def test_workers_of_one_node_build_once_and_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path):
    """Four processes start at once with a cache they cannot create (under a file): one compiles, all load it."""
    log, cc = tmp_path / "compiles.log", tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho run >> {log}\nsleep 1\nexec cc "$@"\n')
    cc.chmod(0o755)
    (tmp_path / "home").write_text("a file, so no cache directory can be made under it")
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "home" / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
        "CC": str(cc),
    }
    (tmp_path / "tmp").mkdir()
    code = "from raytopk import kernels; print('loaded' if kernels.library() else 'not loaded')"
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    assert [run.communicate(timeout=120)[0].strip() for run in runs] == ["loaded"] * 4
    assert log.read_text().count("run") == 1
    assert len(_libraries(tmp_path / "tmp" / f"raytopk-{os.getuid()}" / "kernels")) == 1


def _state_builds_on_creation(rank, world_size, cache):
    os.environ["XDG_CACHE_HOME"] = cache
    kernels.library.cache_clear()
    TopKState(ratio=0.01)  # on a gloo group: its CPU buckets will use the kernels
    return len(_libraries(Path(cache) / "raytopk" / "kernels"))


def test_a_cpu_state_builds_the_kernels_when_it_is_created_not_in_the_backward_pass(tmp_path):
    assert run_ranks(_state_builds_on_creation, 2, str(tmp_path)) == [1, 1]


def test_without_a_compiler_the_pytorch_path_runs_with_one_warning(tmp_path):
    printed = _build(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert "not loaded" in printed
    assert printed.count("could not build its C kernels") == 1 and "RAYTOPK_KERNELS=0" in printed
    assert not _libraries(tmp_path / "raytopk" / "kernels"), "a failed build must leave nothing behind"
    assert not [p for p in (tmp_path / "raytopk" / "kernels").iterdir() if p.suffix != ".lock"]


def test_raytopk_kernels_0_turns_them_off_silently(tmp_path):
    printed = _build(tmp_path, RAYTOPK_KERNELS="0")
    assert "not loaded" in printed and "could not build" not in printed


def _train(rank, world_size, kernels_on, options):
    """A few steps of DDP with the hook on a model whose bucket takes the sampled path; the weights and residuals
    after."""
    os.environ["RAYTOPK_KERNELS"] = "1" if kernels_on else "0"
    kernels.library.cache_clear()  # importing this module to unpickle _train loaded them already
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    ddp = DDP(model, bucket_cap_mb=25)
    state = TopKState(ratio=0.01, start_iter=1, module=model, **options)
    ddp.register_comm_hook(state, topk_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(6):
        g = torch.Generator().manual_seed(100 * step + rank)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            ddp(torch.randn(16, 64, generator=g)), torch.randint(10, (16,), generator=g)
        ).backward()
        optimizer.step()
    assert (kernels.library() is not None) == kernels_on
    # As bytes: tensors would cross to the parent through this process's shared memory, gone when it exits.
    return (
        [p.detach().numpy().tobytes() for p in model.parameters()],
        {name: r.numpy().tobytes() for name, r in state.state_dict()["residuals"].items()},
    )


@pytest.mark.parametrize("options", [{}, {"exchange": "sharded"}], ids=["allgather", "sharded"])
def test_training_is_bit_identical_with_and_without_kernels(options):
    """Everything the hook does with them (accumulate, select, decode, check) against the PyTorch path, over real
    gloo."""
    on = run_ranks(_train, 2, True, options)
    off = run_ranks(_train, 2, False, options)
    for (weights, residuals), (weights_off, residuals_off) in zip(on, off):
        assert weights == weights_off
        assert residuals == residuals_off
        assert any(torch.frombuffer(bytearray(r), dtype=torch.float32).any() for r in residuals.values()), (
            "nothing was held back: the test did not compress"
        )
