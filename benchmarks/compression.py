"""Time exact top-k selection on one CPU thread: raytopk's select_topk against torch.topk.

What is measured: for float32 tensors of 1M, 10M and 25M elements (``torch.randn``;
with ``--nonzero f`` all but a fraction ``f`` of them zero, as in the gradient of
dead units or of an embedding's unused rows) and ``k = ratio * n`` (1% by
default), the median wall time of

- ``raytopk.compression.select_topk(x, k)`` (sampled threshold, then an exact topk
  over the few candidates),
- ``torch.topk(x.abs(), k, sorted=False)`` (the plain exact selection),
- ``x.abs()`` alone: one pass that reads the tensor and writes a new one, the
  yardstick the target is set against (select_topk within 1.0x of it),
- ``x.sum()``: one read and nothing written, the floor any selection pays.

Everything runs with ``torch.set_num_threads(1)``, as Ray workers do. abs, sum
and select_topk run in turns, one call each per round, so the ratios compare
runs that shared the machine's state; each timing is the median over
``--repeats`` rounds after one warm-up call. torch.topk is timed alone, with
fewer repeats above 10M elements (it takes about a second). The script also
checks that select_topk picks exactly the magnitudes torch.topk picks (the
same index set, but for which of several tied zeros).

Reproduce (from the repository root)::

    python benchmarks/compression.py

Results go to ``benchmarks/results/compression.json``.
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

from raytopk.compression import select_topk
from raytopk.storage import write_json

COMMAND = "python benchmarks/compression.py"


def median_seconds(fns: dict, repeats: int) -> dict:
    """Median seconds per function, calling each once per round, in turns."""
    for fn in fns.values():
        fn()  # warm-up: allocator and caches
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(n: int, ratio: float, repeats: int, nonzero: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=generator)
    if nonzero < 1.0:
        x *= torch.rand(n, generator=generator) < nonzero
    k = max(1, math.ceil(ratio * n))
    topk_repeats = repeats if n <= 10_000_000 else max(1, repeats // 3)
    side_by_side = median_seconds(
        {"abs": lambda: x.abs(), "sum": lambda: x.sum(), "select": lambda: select_topk(x, k)}, repeats
    )
    abs_s, sum_s, select_s = side_by_side["abs"], side_by_side["sum"], side_by_side["select"]
    topk_s = median_seconds({"topk": lambda: torch.topk(x.abs(), k, sorted=False)}, topk_repeats)["topk"]
    chosen, _ = select_topk(x, k)
    expected, _ = torch.topk(x.abs(), k, sorted=False)
    exact = torch.equal(chosen.abs().sort().values, expected.sort().values)
    return {
        "numel": n,
        "nonzero": int(torch.count_nonzero(x)),
        "k": k,
        "abs_ms": abs_s * 1e3,
        "sum_ms": sum_s * 1e3,
        "select_topk_ms": select_s * 1e3,
        "torch_topk_ms": topk_s * 1e3,
        "select_over_abs": select_s / abs_s,
        "topk_over_abs": topk_s / abs_s,
        "topk_over_select": topk_s / select_s,
        "repeats": {"abs, sum, select_topk (in turns)": repeats, "torch_topk": topk_repeats},
        "exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 25_000_000])
    parser.add_argument("--ratio", type=float, default=0.01, help="fraction of entries selected")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--nonzero", type=float, default=1.0, help="fraction of entries left nonzero, in (0, 1]")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "compression.json"))
    args = parser.parse_args()
    if not 0.0 < args.nonzero <= 1.0:
        parser.error(f"--nonzero must be in (0, 1], got {args.nonzero}")

    torch.set_num_threads(1)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, k = {args.ratio:g} n, median of runs")
    print(
        f"{'n':>11} {'k':>8} {'sum ms':>7} {'abs ms':>8} {'select ms':>10} {'topk ms':>9} "
        f"{'select/abs':>11} {'topk/abs':>9} {'topk/select':>12} {'exact':>6}"
    )
    for n in args.sizes:
        row = measure(n, args.ratio, args.repeats, args.nonzero)
        rows.append(row)
        print(
            f"{n:>11,} {row['k']:>8,} {row['sum_ms']:>7.1f} {row['abs_ms']:>8.1f} {row['select_topk_ms']:>10.1f} "
            f"{row['torch_topk_ms']:>9.1f} {row['select_over_abs']:>11.2f} {row['topk_over_abs']:>9.2f} "
            f"{row['topk_over_select']:>12.2f} {str(row['exact']):>6}"
        )

    write_json(
        args.output,
        {
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "ratio": args.ratio,
            "nonzero_fraction": args.nonzero,
            "dtype": "float32",
            "results": rows,
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
