"""The xla_gemm route's parts at one M: activation-pass tiles and epilogue tiles, one at a time.

    python3 benchmarks/route_parts_ab.py [--m 256] [--k 8192] [--n 28672] [--hlo FILE]

profile_op.py splits the route at M = 256 into cuBLAS's int8 GEMM and jint8's kernels around
it; this times the whole op (bench_int8_matmul.time_op, the same inputs) with the table's plan
first and last, and in between each variant that changes one part: the activation pass's
QuantizeConfig (block_rows x block_cols / warps) and the epilogue kernel's tiles (block_m x
block_n [x block_k, the overflow sweep's step] / warps). --hlo writes the compiled route's
optimized HLO, to name the XLA fusions between the kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_int8_matmul as bench  # noqa: E402
from jint8.ops.int8_matmul import configs  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas  # noqa: E402

QUANTIZE = ["4x2048/4", "1x8192/8", "2x8192/8", "1x8192/16", "1x8192/4", "2x4096/4"]
EPILOGUE = ["64x64/4", "128x64/4", "256x64/8", "256x32/4", "128x128/8", "256x128/8", "64x128/4"]


def quantize_variant(plan, spec):
    tiles, warps = spec.split("/")
    rows, cols = map(int, tiles.split("x"))
    return dataclasses.replace(plan, quantize=configs.QuantizeConfig(
        block_rows=rows, block_cols=cols, num_warps=int(warps)))


def epilogue_variant(plan, spec):
    """block_m x block_n[x block_k] / warps (block_k: the overflow sweep's K step)."""
    tiles, warps = spec.split("/")
    bm, bn, *bk = map(int, tiles.split("x"))
    return dataclasses.replace(plan, gemm=dataclasses.replace(
        plan.gemm, block_m=bm, block_n=bn, num_warps=int(warps),
        block_k=bk[0] if bk else plan.gemm.block_k))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--k", type=int, default=bench.LAYER[0])
    parser.add_argument("--n", type=int, default=bench.LAYER[1])
    parser.add_argument("--quantize", nargs="*", default=QUANTIZE)
    parser.add_argument("--epilogue", nargs="*", default=EPILOGUE)
    parser.add_argument("--hlo", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    # the sweep's inputs and the table's plan for this one case
    k, n, m, xs, wq_nk, col_scales, table = next(bench._sweep_cases(
        rng, [(args.k, args.n)], [args.m]))
    print(f"{jax.devices()[0].device_kind}, M={m} K={k} N={n}; table: {table}", flush=True)
    if args.hlo:
        op = jax.jit(lambda x, w: int8_matmul_pallas(
            x, w, col_scales, threshold=bench.THRESHOLD, outlier_capacity=bench.CAPACITY,
            weight_layout="nk", plan=table)[0])
        with open(args.hlo, "w") as f:
            f.write(op.lower(xs[0], wq_nk[0]).compile().as_text())
    variants = [("table (first)", table)]
    variants += [(f"quantize {s}", quantize_variant(table, s)) for s in args.quantize]
    variants += [(f"epilogue {s}", epilogue_variant(table, s)) for s in args.epilogue]
    variants += [("table (last)", table)]
    for label, plan in variants:
        seconds = bench._time_plan(m, plan, xs, wq_nk, col_scales)
        if seconds is not None:
            print(f"RESULT {label:24s} {seconds * 1e3:.4f} ms", flush=True)


if __name__ == "__main__":
    main()
