"""Where one int8_matmul call's GPU time goes: a profile of the public op, by kernel.

    python3 tools/profile_op.py [--m 256] [--k 8192] [--n 28672] [--calls 20] [--out DIR]
    python3 tools/profile_op.py --in-jit [--m 16 --k 4096 --n 4096]

benchmarks/bench_int8_matmul.py times the whole jitted op; this traces --calls back-to-back
calls of the same op on the same inputs (bench_int8_matmul's activations: 8 outlier columns,
threshold 6 unless --threshold; --outliers C: exactly C outlier columns; K-major int8 weights) and prints profile_summary's
per-kernel table, so a route's time splits into its kernels (activation pass, outlier operands,
GEMM, epilogue) and the gaps between them (GPU busy against the traced span).

--in-jit profiles bench_int8_matmul's "in one jit" harness instead: its rotating activation sets
and weight copies (so a layer that fits in L2 streams cold weights, as in a model) in one jitted
executable, and XLA's bf16 x @ W the same way; 'ms per token' is then per op.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profile_summary
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_int8_matmul as bench  # noqa: E402
import profile_summary  # noqa: E402
from jint8.ops.int8_matmul.api import int8_matmul  # noqa: E402


def trace_calls(op, args, calls, out=None) -> str:
    """Traces `calls` back-to-back calls of op(*args) (compiled first) into the directory `out`
    (default: a new temporary one), with a perfetto trace profile_summary reads; returns it."""
    jax.block_until_ready(op(*args))
    out = out or tempfile.mkdtemp(prefix="jint8_profile_op_")
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(calls):
            result = op(*args)
        jax.block_until_ready(result)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--k", type=int, default=bench.LAYER[0])
    parser.add_argument("--n", type=int, default=bench.LAYER[1])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=bench.THRESHOLD,
                        help="0: no outlier decomposition (the route without its outlier terms)")
    parser.add_argument("--outliers", type=int, default=None,
                        help="exactly this many outlier columns (bench_int8_matmul's "
                             "--outlier-sweep inputs) instead of the 8 of its default inputs")
    parser.add_argument("--out", default=None, help="trace directory (default: a temporary one)")
    parser.add_argument("--in-jit", action="store_true",
                        help="profile bench_int8_matmul's in-one-jit harness, jint8 and bf16")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.in_jit:
        return in_jit(rng, args.m, args.k, args.n, args.out)
    if args.outliers is None:
        x = bench.activations(rng, args.m, args.k, 1)[0]
    else:
        x = bench.activations_with_outliers(rng, args.m, args.k, args.outliers, 1)[0]
    wq = jax.numpy.asarray(rng.integers(-127, 128, (args.n, args.k), dtype=np.int8))
    col_scales = jax.numpy.asarray(rng.uniform(0.01, 0.1, args.n).astype(np.float32))
    op = jax.jit(lambda x, wq: int8_matmul(
        x, wq, col_scales, threshold=args.threshold, outlier_capacity=bench.CAPACITY,
        weight_layout="nk", backend="pallas_triton"))
    out = trace_calls(op, (x, wq), args.calls, args.out)
    print(f"{jax.devices()[0].device_kind}: int8_matmul M={args.m} K={args.k} N={args.n}, "
          f"threshold {args.threshold}, {args.outliers if args.outliers is not None else 'up to 8'} "
          f"outlier columns, "
          f"{args.calls} calls ('ms per token' below is per call)")
    profile_summary.main([out, "--tokens", str(args.calls)])


def in_jit(rng, m, k, n, out=None, calls=4):
    """Per-kernel profile of bench_int8_matmul.time_in_one_jit's executable, jint8 then bf16."""
    wq, col_scales = bench.weight_copies(rng, k, n)
    wq_nk = [w.T.copy() for w in wq]
    w_bf16 = bench.bf16_weights(wq, col_scales)
    jint8 = bench.ops_for(col_scales)[0]
    xs = bench.activations(rng, m, k, bench.sets_for(m, k, n))
    for name, op, weights in (("jint8", jint8, wq_nk), ("XLA bf16", lambda x, w: x @ w, w_bf16)):
        pairs = [(x, weights[i % len(weights)]) for i, x in enumerate(xs)]
        wall = bench.time_in_one_jit(op, xs, weights)
        trace = trace_calls(jax.jit(lambda pairs, op=op: [op(x, w) for x, w in pairs]),
                            (pairs,), calls, out and os.path.join(out, name.replace(" ", "_")))
        print(f"\n{jax.devices()[0].device_kind}: {name} M={m} K={k} N={n} in one jit: "
              f"{len(pairs)} ops over {len(weights)} weight copies, {wall * 1e3:.4f} ms per op "
              f"(wall); 'ms per token' below is per op")
        profile_summary.main([trace, "--tokens", str(calls * len(pairs)), "--top", "8"])


if __name__ == "__main__":
    main()
