"""How fast can a Pallas (Triton) K loop stream int8 weights at M = 1? A probe, not a kernel of jint8.

    python3 benchmarks/stream_probe.py [--shapes 4096x28672 ...]

Times three weight-streaming kernels that do only the int8 MMA of the fused decode kernel (a
constant int8 activation, no absmax sweep, no quantization, no outlier flags) next to the real
fused kernel (the table's plan) on the same K-major weights:
  strided  wq[N, K], program j reads [block_n, block_k] tiles: block_n rows of block_k bytes each,
           K apart (the fused kernel's access pattern)
  tiled    the same tiles stored contiguously, [N / block_n, K / block_k, block_n, block_k]: each
           K step reads one block_n * block_k run of bytes
  xla_sum  XLA's int32 row sum of wq[N, K] (a plain streaming reduction, for reference)
Each kernel runs inside a jitted loop over COPIES distinct weights (together > 2x L2), each call
taking the previous call's output as an unused operand so the calls stay in order. Prints us per
call and int8 weight bytes / time.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

L2_BYTES = 50 * 2**20
REPS = 20


def _stream_kernel(w_ref, prev_ref, out_ref, *, tiled: bool, k: int, bn: int, bk: int,
                   split: int):
    del prev_ref
    j, s = pl.program_id(0), pl.program_id(1)
    steps = k // bk // split
    ones = jnp.ones((16, bk), jnp.int8)

    def step(i, acc):
        step = s * steps + i
        if tiled:
            rows = (j * steps * split + step) * bn + jnp.arange(bn)
            cols = jnp.arange(bk)
        else:
            rows = j * bn + jnp.arange(bn)
            cols = step * bk + jnp.arange(bk)
        w = plgpu.load(w_ref.at[rows[:, None], cols[None, :]])
        return acc + jax.lax.dot_general(ones, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((16, bn), jnp.int32))
    plgpu.store(out_ref.at[s * out_ref.shape[0] // split + j * bn + jnp.arange(bn)],
                jnp.max(acc, axis=0))


@functools.partial(jax.jit, static_argnames=("tiled", "n", "k", "bn", "bk", "split", "warps",
                                             "stages"))
def stream(w, prev, *, tiled, n, k, bn, bk, split, warps, stages):
    """[split * n] int32: each program's partial (row 0 of its accumulator)."""
    return pl.pallas_call(
        functools.partial(_stream_kernel, tiled=tiled, k=k, bn=bn, bk=bk, split=split),
        grid=(n // bn, split), out_shape=jax.ShapeDtypeStruct((split * n,), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(w, prev)


def tile_weight(w, bn, bk):
    n, k = w.shape
    return w.reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3).reshape(-1, bk)


def time_chain(call, ws, size):
    @jax.jit
    def chain(ws):
        def body(_, prev):
            for w in ws:
                prev = call(w, prev)
            return prev
        return jax.lax.fori_loop(0, REPS, body, jnp.zeros((size,), jnp.int32))

    jax.block_until_ready(chain(ws))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(chain(ws))
        times.append((time.perf_counter() - start) / (len(ws) * REPS))
    return sorted(times)[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x6144", "4096x4096", "4096x28672",
                                                         "14336x4096", "8192x28672"])
    parser.add_argument("--configs", nargs="+",
                        default=["256x128/1/8/4", "256x256/1/8/4", "128x256/1/8/4", "64x512/1/8/4"],
                        help="block_n x block_k / split_k / num_warps / num_stages")
    parser.add_argument("--tiled", action="store_true", help="also time the contiguous-tile layout")
    args = parser.parse_args()
    from jint8.ops.int8_matmul import configs
    from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        copies = max(2, min(16, math.ceil(2 * L2_BYTES / (k * n))))
        ws = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)]
        rows = []
        # prev == a value it never holds: an operand XLA cannot fold away, so no call is hoisted.
        sum_call = lambda w, prev: (jnp.sum(w, axis=1, dtype=jnp.int32)  # noqa: E731
                                    + (prev[:n] == -12345).astype(jnp.int32))
        rows.append(("xla_sum", time_chain(sum_call, ws, n)))
        scale = jnp.ones((n,), jnp.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        x[:, rng.choice(k, 8, replace=False)] *= 20
        x = jnp.asarray(x, jnp.bfloat16)
        plan = configs.plan_for(jax.devices()[0].device_kind, 1, k, n, "nk")

        def fused(w, prev, plan=plan):
            x_dep = x + (prev[0] == -12345).astype(x.dtype)  # one tiny extra XLA kernel per call
            y = int8_matmul_pallas(x_dep, w, scale, threshold=6.0, outlier_capacity=64,
                                   weight_layout="nk", plan=plan)[0]
            return jax.lax.bitcast_convert_type(y.astype(jnp.float32), jnp.int32)[0]

        g = plan.gemm
        rows.append((f"fused table {g.block_n}x{g.block_k}/{g.split_k}/{g.num_warps}/{g.num_stages}",
                     time_chain(fused, ws, n)))
        for spec in args.configs:
            tile, split, warps, stages = spec.split("/")
            bn, bk = map(int, tile.split("x"))
            split, warps, stages = int(split), int(warps), int(stages)
            for tiled in (False, True) if args.tiled else (False,):
                weights = [tile_weight(w, bn, bk) for w in ws] if tiled else ws
                call = functools.partial(stream, tiled=tiled, n=n, k=k, bn=bn, bk=bk, split=split,
                                         warps=warps, stages=stages)
                try:
                    seconds = time_chain(call, weights, split * n)
                except Exception as e:  # noqa: BLE001 (a tile that does not compile)
                    print(f"  {spec} tiled={tiled}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                label = f"{'tiled' if tiled else 'strided'} {spec} ({n // bn * split} programs)"
                rows.append((label, seconds))
        print(f"K x N = {k} x {n} ({k * n / 2**20:.0f} MiB int8, {copies} copies)")
        for label, seconds in rows:
            print(f"  {label:40s} {seconds * 1e6:7.1f} us  {k * n / seconds / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
