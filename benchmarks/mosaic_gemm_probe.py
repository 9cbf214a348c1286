"""Can a Mosaic GPU int8 GEMM beat XLA's (cuBLAS) at M = 256? A probe, not a kernel of jint8.

    python3 benchmarks/mosaic_gemm_probe.py [--shapes 256x8192x28672 4096x8192x28672]
                                            [--configs 128x128x128/4 ...]

#3's M = 256 target (0.13 ms for the whole LLM.int8 op on 8192x28672) needs the int8 GEMM near
0.1 ms; XLA's int8 GEMM alone took 0.156 ms there (NOTES_int8_matmul.md), so jint8's xla_gemm route
cannot reach it. This times a plain Hopper int8 GEMM written with Pallas Mosaic GPU against XLA's
int8 dot on the same K-major operands (xq [M, K], wq [N, K], int32 [M, N] out, as the xla_gemm
route consumes it): program (i, j) owns a [tile_m, tile_n] output tile and walks K in tile_k steps
through an emit_pipeline of `stages` TMA buffers, one int8 wgmma per step (A = the activation
tile, B = the weight tile transposed in place: int8 wgmma reads both K-major), accumulating in
int32 registers, then writes its tile through shared memory by TMA. Every config is checked
equal to XLA's product before it is timed, in the same CUDA-graph loop as stream_probe.py. If the
best config is clearly faster than XLA, a kernel with jint8's epilogue fused is worth building.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plmgpu  # noqa: E402

from stream_probe import time_chain  # noqa: E402

# one warpgroup holds the int32 accumulator: tile_m * tile_n / 128 registers per thread (<= 128)
DEFAULT_CONFIGS = ["128x128x128/4", "64x256x128/4", "128x128x64/6", "64x128x128/6", "128x64x128/6"]


def mosaic_gemm(a, b, prev, *, tile_m: int, tile_n: int, tile_k: int, stages: int):
    """a [M, K] int8 @ b [N, K] int8 .T -> [M, N] int32 (prev: an unused operand, see stream_probe)."""
    m, k = a.shape
    n = b.shape[0]
    if m % tile_m or n % tile_n or k % tile_k:
        raise ValueError(f"{m}x{k}x{n} is not a multiple of the tiles {tile_m}x{tile_k}x{tile_n}")
    swizzle = plmgpu.find_swizzle(tile_k * 8)
    transforms = (plmgpu.TilingTransform((8, swizzle)), plmgpu.SwizzleTransform(swizzle))
    out_swizzle = plmgpu.find_swizzle(tile_n * 32)
    out_transforms = (plmgpu.TilingTransform((8, out_swizzle // 4)), plmgpu.SwizzleTransform(out_swizzle))

    def kernel(a_gmem, b_gmem, prev_gmem, o_gmem, acc, o_smem):
        del prev_gmem
        i, j = jax.lax.axis_index("m"), jax.lax.axis_index("n")

        def body(_, a_smem, b_smem):
            plmgpu.wgmma(acc, a_smem, plmgpu.transpose_ref(b_smem, (1, 0)))
            plmgpu.wgmma_wait(1)

        pipeline = plmgpu.emit_pipeline(
            body, grid=(k // tile_k,), max_concurrent_steps=stages,
            in_specs=[plmgpu.BlockSpec((tile_m, tile_k), lambda s: (0, s), transforms=transforms,
                                       delay_release=1),
                      plmgpu.BlockSpec((tile_n, tile_k), lambda s: (0, s), transforms=transforms,
                                       delay_release=1)])
        pipeline(a_gmem.at[pl.ds(i * tile_m, tile_m)], b_gmem.at[pl.ds(j * tile_n, tile_n)])
        plmgpu.wgmma_wait(0)
        o_smem[...] = acc[...]
        plmgpu.commit_smem()
        plmgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * tile_m, tile_m), pl.ds(j * tile_n, tile_n)])
        plmgpu.wait_smem_to_gmem(0)

    # grid (M tiles, N tiles): the M tiles of one weight tile are launched next to each other,
    # so the weight tile is read from HBM once and from L2 by the others.
    return plmgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.int32),
        grid=(m // tile_m, n // tile_n), grid_names=("m", "n"),
        scratch_types=dict(acc=plmgpu.ACC((tile_m, tile_n), jnp.int32),
                           o_smem=plmgpu.SMEM((tile_m, tile_n), jnp.int32, transforms=out_transforms)),
    )(a, b, prev)


def xla_gemm(a, b, prev):
    a = a + (prev[0, 0] == -12345).astype(jnp.int8)  # prev: keeps the calls in order
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["256x8192x28672", "4096x8192x28672"],
                        help="M x K x N")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="tile_m x tile_n x tile_k / stages")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        m, k, n = map(int, shape.split("x"))
        a = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        copies = 2 if k * n >= 100 * 2**20 else 4
        bs = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)]
        want = jax.jit(xla_gemm)(a, bs[0], jnp.zeros((1, 1), jnp.int32))
        rows = [("xla int8 dot (cuBLAS)", time_chain(lambda b, prev: xla_gemm(a, b, prev), bs, (m, n)))]
        for spec in args.configs:
            tiles, stages = spec.split("/")
            tile_m, tile_n, tile_k = map(int, tiles.split("x"))
            call = functools.partial(mosaic_gemm, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k,
                                     stages=int(stages))
            try:
                got = jax.jit(call)(a, bs[0], jnp.zeros((1, 1), jnp.int32))
                if not bool(jnp.array_equal(got, want)):
                    print(f"  mosaic {spec}: WRONG ({int(jnp.sum(got != want))} elements differ)")
                    continue
                seconds = time_chain(lambda b, prev: call(a, b, prev), bs, (m, n))
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"  mosaic {spec}: {type(e).__name__}: {str(e)[:300]}")
                continue
            rows.append((f"mosaic {spec}", seconds))
        print(f"M x K x N = {m} x {k} x {n}")
        for label, seconds in rows:
            print(f"  {label:32s} {seconds * 1e3:8.3f} ms  {2 * m * k * n / seconds / 1e12:6.0f} TOP/s  "
                  f"{k * n / seconds / 1e12:.2f} TB/s of weights")


if __name__ == "__main__":
    main()
