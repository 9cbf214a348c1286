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
  mosaic   (--mosaic) a Mosaic GPU kernel: TMA copies of [block_n, block_k] weight tiles into
           shared memory in an emit_pipeline of `stages` buffers, each consumed by one int8
           wgmma (the weight tile as the A operand, the 8-row activation as B); checked
           against XLA's int32 product before it is timed
  xla_dot  (--mosaic) XLA's own int8 x int8 -> int32 dot of an 8-row activation, and the bf16
           dot of one row against the same matrix in bf16 (2 bytes per weight)
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

try:  # Mosaic GPU (Hopper): jax's Pallas backend with TMA and wgmma
    from jax.experimental.pallas import mosaic_gpu as plmgpu  # noqa: E402
except ImportError:  # pragma: no cover
    plmgpu = None

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


def mosaic_stream(w, x8, prev, *, bn, bk, stages, split):
    """[split * N, 8] int32: program (j, s)'s int8 product of weight rows j*bn.. and K slice s
    with the 8 activation rows x8 (TMA pipeline of weight tiles, one wgmma per step)."""
    n, k = w.shape
    steps = k // bk // split
    swizzle = plmgpu.find_swizzle(bk * 8)
    transforms = (plmgpu.TilingTransform((8, swizzle)), plmgpu.SwizzleTransform(swizzle))

    def kernel(w_gmem, x_gmem, prev_gmem, o_gmem, acc, o_smem):
        del prev_gmem  # an operand only, so XLA cannot hoist the call out of the timing loop
        j, s = jax.lax.axis_index("n"), jax.lax.axis_index("s")

        def body(_, w_smem, x_smem):
            plmgpu.wgmma(acc, w_smem, plmgpu.transpose_ref(x_smem, (1, 0)))
            plmgpu.wgmma_wait(1)

        pipeline = plmgpu.emit_pipeline(
            body, grid=(steps,), max_concurrent_steps=stages,
            in_specs=[plmgpu.BlockSpec((bn, bk), lambda i: (0, i), transforms=transforms,
                                       delay_release=1),
                      plmgpu.BlockSpec((8, bk), lambda i: (0, i), transforms=transforms,
                                       delay_release=1)])
        cols = pl.ds(s * steps * bk, steps * bk)
        pipeline(w_gmem.at[pl.ds(j * bn, bn), cols], x_gmem.at[:, cols])
        plmgpu.wgmma_wait(0)
        o_smem[...] = acc[...]
        plmgpu.commit_smem()
        plmgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds((s * (n // bn) + j) * bn, bn)])
        plmgpu.wait_smem_to_gmem(0)

    return plmgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((split * n, 8), jnp.int32),
        grid=(n // bn, split), grid_names=("n", "s"),
        scratch_types=dict(acc=plmgpu.ACC((bn, 8), jnp.int32),
                            o_smem=plmgpu.SMEM((bn, 8), jnp.int32)),
    )(w, x8, prev)


def _mosaic_rows(ws, n, k, configs_, rng):
    rows = []
    x8 = jnp.asarray(rng.integers(-127, 128, (8, k), dtype=np.int8))
    want = jax.lax.dot_general(x8, ws[0], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)  # [8, N]
    dot = lambda w, prev: jax.lax.dot_general(  # noqa: E731
        x8 + (prev[0, 0] == -12345).astype(jnp.int8), w, (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.int32).T
    rows.append(("xla_dot int8 M=8", time_chain(dot, ws, (n, 8))))
    wb = [w.astype(jnp.bfloat16) for w in ws[: max(2, len(ws) // 2)]]
    xb = jnp.ones((1, k), jnp.bfloat16)
    bdot = lambda w, prev: jax.lax.bitcast_convert_type(jax.lax.dot_general(  # noqa: E731
        xb + (prev[0, 0] == -12345).astype(jnp.bfloat16), w, (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32), jnp.int32).T
    seconds = time_chain(bdot, wb, (n, 1))
    rows.append(("xla_dot bf16 M=1 (bytes x2)", seconds / 2))
    for spec in configs_:
        tile, split, stages = spec.split("/")
        bn, bk = map(int, tile.split("x"))
        split, stages = int(split), int(stages)
        call = functools.partial(mosaic_stream, x8=x8, bn=bn, bk=bk, stages=stages, split=split)
        try:
            got = jax.jit(lambda w: call(w, prev=jnp.zeros((8,), jnp.int32)))(ws[0]).reshape(split, n, 8).sum(0)
            if not bool(jnp.array_equal(got.T, want)):
                print(f"  mosaic {spec}: WRONG (max diff {int(jnp.max(jnp.abs(got.T - want)))})")
                continue
            seconds = time_chain(lambda w, prev: call(w, prev=prev), ws, (split * n, 8))
        except Exception as e:  # noqa: BLE001 (a tile that does not compile)
            print(f"  mosaic {spec}: {type(e).__name__}: {str(e)[:300]}")
            if os.environ.get("PROBE_TRACEBACK"):
                import traceback
                traceback.print_exc()
            continue
        rows.append((f"mosaic {spec} ({n // bn * split} programs)", seconds))
    return rows


def _xla_dot_m1(w, k, rng):
    """XLA's own int8 x int8 -> int32 dot of one activation row (as naive A8W8 runs at M = 1),
    as a time_chain call; prints which kernel XLA compiled it to."""
    x1 = jnp.asarray(rng.integers(-127, 128, (1, k), dtype=np.int8))
    dot = lambda w, prev: jax.lax.dot_general(  # noqa: E731
        x1 + (prev[0, 0] == -12345).astype(jnp.int8), w, (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.int32).T
    hlo = jax.jit(dot).lower(w, jnp.zeros((w.shape[0], 1), jnp.int32)).compile().as_text()
    for line in hlo.splitlines():
        if any(key in line for key in ("custom_call_target", "triton_gemm_config", "kind=k",
                                       "__cublas", "fusion_backend_config")):
            print("   xla M=1:", line.strip()[:400])
    return dot


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
        shape = size if isinstance(size, tuple) else (size,)
        return jax.lax.fori_loop(0, REPS, body, jnp.zeros(shape, jnp.int32))

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
    parser.add_argument("--mosaic", nargs="*", default=None,
                        help="also time Mosaic GPU TMA/wgmma streams: block_n x block_k / split / "
                             "stages (no value: a default set), and XLA's int8 and bf16 dots")
    parser.add_argument("--xla-m1", action="store_true",
                        help="also time XLA's int8 dot of one activation row (and print its kernel)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton rows")
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
        if args.mosaic is not None:
            rows += _mosaic_rows(ws, n, k, args.mosaic or [
                "128x256/1/4", "64x256/1/6", "256x256/1/3", "128x512/1/3", "128x128/1/8",
                "64x256/2/4", "128x256/2/4", "64x128/4/6"], rng)
        if args.no_triton:
            print(f"K x N = {k} x {n} ({k * n / 2**20:.0f} MiB int8, {copies} copies)")
            for label, seconds in rows:
                print(f"  {label:40s} {seconds * 1e6:7.1f} us  {k * n / seconds / 1e12:.2f} TB/s")
            continue
        # prev == a value it never holds: an operand XLA cannot fold away, so no call is hoisted.
        sum_call = lambda w, prev: (jnp.sum(w, axis=1, dtype=jnp.int32)  # noqa: E731
                                    + (prev[:n] == -12345).astype(jnp.int32))
        rows.append(("xla_sum", time_chain(sum_call, ws, n)))
        if args.xla_m1:
            rows.append(("xla_dot int8 M=1", time_chain(_xla_dot_m1(ws[0], k, rng), ws, (n, 1))))
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
