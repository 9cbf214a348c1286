"""Where one int8_matmul call's GPU time goes: a profile of the public op, by kernel.

    python3 benchmarks/profile_op.py [--m 256] [--k 8192] [--n 28672] [--calls 20] [--out DIR]

bench_int8_matmul.py times the whole jitted op; this traces --calls back-to-back calls of the
same op on the same inputs (bench_int8_matmul's activations: 8 outlier columns, threshold 6
unless --threshold, capacity 64; K-major int8 weights) and prints profile_summary's per-kernel
table, so a route's time splits into its kernels (activation pass, outlier operands, GEMM,
epilogue) and the gaps between them (GPU busy against the traced span).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    parser.add_argument("--out", default=None, help="trace directory (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = bench.activations(rng, args.m, args.k, 1)[0]
    wq = jax.numpy.asarray(rng.integers(-127, 128, (args.n, args.k), dtype=np.int8))
    col_scales = jax.numpy.asarray(rng.uniform(0.01, 0.1, args.n).astype(np.float32))
    op = jax.jit(lambda x, wq: int8_matmul(
        x, wq, col_scales, threshold=args.threshold, outlier_capacity=bench.CAPACITY,
        weight_layout="nk", backend="pallas_triton"))
    out = trace_calls(op, (x, wq), args.calls, args.out)
    print(f"{jax.devices()[0].device_kind}: int8_matmul M={args.m} K={args.k} N={args.n}, "
          f"threshold {args.threshold}, "
          f"{args.calls} calls ('ms per token' below is per call)")
    profile_summary.main([out, "--tokens", str(args.calls)])


if __name__ == "__main__":
    main()
