"""Times the outlier-operands kernel alone (pallas_triton_outliers) per tiling, on one GPU.

    python3 benchmarks/outlier_operands_probe.py [--m 256] [--k 8192] [--n 28672]
                                                 [--configs ROWSxCOLS/WARPS ...]

profile_op.py showed it at 22 us per call at M = 256 on 8192x28672 (8 flagged columns,
capacity 64): this times its block_rows x block_cols / num_warps against XLA's formulation
(outlier_operands_reference) on the same inputs, each checked equal first. Times are GPU kernel
time from a profile of 20 calls (the sum of the call's kernels): a wall-clock loop of a ~20 us
op would read the host's dispatch floor.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_int8_matmul as bench  # noqa: E402
import profile_summary  # noqa: E402
from profile_op import trace_calls  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton_outliers import (  # noqa: E402
    outlier_operands,
    outlier_operands_reference,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--k", type=int, default=bench.LAYER[0])
    parser.add_argument("--n", type=int, default=bench.LAYER[1])
    parser.add_argument("--flagged", type=int, default=bench.NUM_OUTLIER_COLS)
    parser.add_argument("--configs", nargs="+",
                        default=["32x256/4", "32x256/8", "32x64/4", "32x128/4", "16x64/4",
                                 "32x64/8", "64x32/4"])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    m, k, n = args.m, args.k, args.n
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    flags = np.zeros(k, np.int32)
    flags[rng.choice(k, args.flagged, replace=False)] = 1
    flags = jnp.asarray(flags)
    kw = dict(capacity=bench.CAPACITY, slots_n=bench.CAPACITY, weight_layout="nk")
    print(f"{jax.devices()[0].device_kind}: outlier operands M={m} K={k} N={n}, "
          f"{args.flagged} flagged", flush=True)
    reference = jax.jit(functools.partial(outlier_operands_reference, **kw))
    want = reference(x, xq, wq, flags)
    rows = [("XLA (outlier_operands_reference)", reference)]
    for spec in args.configs:
        tiles, warps = spec.split("/")
        block_rows, block_cols = map(int, tiles.split("x"))
        rows.append((f"kernel {spec}", jax.jit(functools.partial(
            outlier_operands, **kw, block_rows=block_rows, block_cols=block_cols,
            num_warps=int(warps)))))
    for label, op in rows:
        got = op(x, xq, wq, flags)
        same = all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))
        print(f"  {label:36s} {kernel_micros(op, (x, xq, wq, flags)):8.1f} us  equal: {same}",
              flush=True)


def kernel_micros(op, args, calls=20):
    """GPU kernel microseconds per call of op(*args), from a profile of `calls` calls."""
    (path,) = pathlib.Path(trace_calls(op, args, calls)).rglob("*perfetto_trace.json.gz")
    total, _, _ = profile_summary.gpu_kernel_times(path)
    return sum(total.values()) / calls


if __name__ == "__main__":
    main()
