"""Can a warp-specialised, persistent Mosaic GPU int8 GEMM beat XLA's (cuBLAS) at M = 256?

    python3 benchmarks/mosaic_ws_probe.py [--shapes 256x8192x28672 ...] [--configs SPEC ...]

mosaic_gemm_probe.py's plain kernel (one program per output tile, one emit_pipeline) ran 1.5x
behind cuBLAS (0.206 vs 0.134 ms at 256x8192x28672). This probe is the structure of jax's
hopper_matmul_mgpu example, made int8: a persistent grid of one cluster per SM pair walking the
output tiles, one memory warpgroup feeding TMA stages and two compute warpgroups, each holding a
[tile_m, tile_n] int32 wgmma accumulator (both int8 operands K-major: the weight tile is
transposed in place), optional 2-CTA clusters that multicast the operand the pair shares, and a
tiled epilogue through shared memory. Every config is checked equal to XLA's int32 product
before it is timed in stream_probe's CUDA-graph loop. SPEC:
    tile_m x tile_n x tile_k / stages / wg{M,N} / cl{-,M,N} / minor{M,N} / grid_tile_width
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from mosaic_gemm_probe import xla_gemm  # noqa: E402
from stream_probe import time_chain  # noqa: E402

DEFAULT_CONFIGS = [
    "128x128x128/4/wgM/cl-/minorN/1",
    "128x128x128/4/wgN/cl-/minorN/1",
    "128x128x128/4/wgN/cl-/minorM/1",
    "64x256x128/4/wgM/cl-/minorN/1",
    "128x64x128/6/wgM/cl-/minorN/1",
    "128x128x128/4/wgM/clN/minorN/1",
    "128x128x128/4/wgN/clM/minorN/1",
    "64x256x128/4/wgM/clN/minorN/1",
    "128x64x128/6/wgM/clN/minorN/1",
    "128x128x64/8/wgM/cl-/minorN/1",
    "128x128x256/2/wgM/cl-/minorN/1",
    "128x128x128/3/wgM/cl-/minorN/1",
    "128x128x128/4/wgN/cl-/minorM/8",
]


@dataclasses.dataclass(frozen=True)
class WsConfig:
    tile_m: int
    tile_n: int
    tile_k: int
    stages: int
    wg_dim: str  # "M" or "N": the axis the two compute warpgroups split
    cluster_dim: str  # "-", "M" or "N": the axis a 2-CTA cluster splits
    grid_minor: str
    grid_tile_width: int
    epi_n: int = 64  # the epilogue's tile width (its shared-memory slots are [64, epi_n] int32)
    delay_release: int = 0  # 1: keep one wgmma in flight (the stage is released a step later)

    @classmethod
    def parse(cls, spec: str) -> "WsConfig":
        tiles, stages, wg, cl, minor, width, *extra = spec.split("/")
        tile_m, tile_n, tile_k = map(int, tiles.split("x"))
        options = {}
        for item in extra:  # "epi32", "d1"
            if item.startswith("epi"):
                options["epi_n"] = int(item[3:])
            elif item.startswith("d"):
                options["delay_release"] = int(item[1:])
            else:
                raise ValueError(f"unknown option {item!r} in {spec!r}")
        return cls(tile_m, tile_n, tile_k, int(stages), wg[2:], cl[2:], minor[5:], int(width),
                   **options)


def _transposed(ref):
    """The [n, k] shared-memory tile as the wgmma's [k, n] B operand (int8 wgmma reads both
    operands K-major): ref.transpose where the installed jax has it (0.11), else transpose_ref."""
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def ws_gemm(a, b, prev, *, config: WsConfig, num_sms=None, interpret=False):
    """a [M, K] int8 @ b [N, K] int8 .T -> [M, N] int32 (prev: unused, see stream_probe)."""
    m, k = a.shape
    n = b.shape[0]
    c = config
    cta_m = c.tile_m * (2 if c.wg_dim == "M" else 1)
    cta_n = c.tile_n * (2 if c.wg_dim == "N" else 1)
    cl_m = cta_m * (2 if c.cluster_dim == "M" else 1)
    cl_n = cta_n * (2 if c.cluster_dim == "N" else 1)
    if m % cl_m or n % cl_n or k % c.tile_k:
        raise ValueError(
            f"{m}x{k}x{n} is not a multiple of the cluster tile {cl_m}x{c.tile_k}x{cl_n}")
    m_iters, n_iters, k_iters = m // cl_m, n // cl_n, k // c.tile_k
    swizzle = plgpu.find_swizzle(c.tile_k * 8)
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    epi_m, epi_n = 64, c.epi_n
    out_swizzle = plgpu.find_swizzle(epi_n * 32)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)),
                      plgpu.SwizzleTransform(out_swizzle))
    num_out_slots = min(2, (c.tile_m * c.tile_n) // (epi_m * epi_n))
    cluster_size = 2 if c.cluster_dim != "-" else 1

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, c.tile_k), lambda s: (0, s), transforms=transforms,
                                memory_space=plgpu.SMEM, delay_release=c.delay_release,
                                collective_axes=("cluster",) if c.cluster_dim == "N" else ()),
                plgpu.BlockSpec((cta_n, c.tile_k), lambda s: (0, s), transforms=transforms,
                                memory_space=plgpu.SMEM, delay_release=c.delay_release,
                                collective_axes=("cluster",) if c.cluster_dim == "M" else ()),
            ],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=c.stages,
            compute_context=compute_context)

    def kernel(a_gmem, b_gmem, prev_gmem, out_gmem):
        del prev_gmem
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), jnp.int32,
                                transforms=out_transforms),
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, out_smem):
            wg_idx = lax.axis_index("wg")
            cta_idx = lax.axis_index("cluster") if cluster_size > 1 else 0

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
            def _mn_loop(loop_info):
                (lin,) = loop_info.index
                mi, ni = plgpu.planar_snake(
                    lin, (m_iters, n_iters),
                    0 if c.grid_minor == "M" else 1, c.grid_tile_width)
                if c.cluster_dim == "M":
                    mi = mi * 2 + cta_idx
                elif c.cluster_dim == "N":
                    ni = ni * 2 + cta_idx
                cta_m_slice = pl.ds(mi * cta_m, cta_m)
                cta_n_slice = pl.ds(ni * cta_n, cta_n)
                wg_m = pl.ds(wg_idx * c.tile_m, c.tile_m) if c.wg_dim == "M" else slice(None)
                wg_n = pl.ds(wg_idx * c.tile_n, c.tile_n) if c.wg_dim == "N" else slice(None)

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped,
                                       acc_ref=plgpu.ACC((c.tile_m, c.tile_n), jnp.int32))
                    def _acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for ei in range(c.tile_m // epi_m):
                            for ej in range(c.tile_n // epi_n):
                                em = slice(ei * epi_m, (ei + 1) * epi_m)
                                en = slice(ej * epi_n, (ej + 1) * epi_n)
                                slot = (ei * (c.tile_n // epi_n) + ej) % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg_idx, slot] = acc[em, en]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg_idx, slot],
                                    out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n].at[em, en])

                def mma_body(_, a_smem, b_smem, acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[wg_m], _transposed(b_smem.at[wg_n]))
                    plgpu.wgmma_wait(c.delay_release)
                    return acc_ref

                get_pipeline(mma_body, compute_context)(
                    a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :],
                    allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    num_sms = num_sms or jax.devices()[0].core_count
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.int32),
        grid=(num_sms // cluster_size,), grid_names=("cluster_grid",),
        cluster=(cluster_size,), cluster_names=("cluster",),
        num_threads=3, thread_name="wg", interpret=interpret,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(a, b, prev)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["256x8192x28672"], help="M x K x N")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="see the docstring")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        m, k, n = map(int, shape.split("x"))
        a = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        bs = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(2)]
        prev0 = jnp.zeros((1, 1), jnp.int32)
        want = jax.jit(xla_gemm)(a, bs[0], prev0)
        seconds = time_chain(lambda b, prev: xla_gemm(a, b, prev), bs, (m, n))
        print(f"M x K x N = {m} x {k} x {n}")
        report = lambda label, s: print(  # noqa: E731
            f"  {label:40s} {s * 1e3:8.3f} ms  {2 * m * k * n / s / 1e12:6.0f} TOP/s  "
            f"{k * n / s / 1e12:.2f} TB/s of weights", flush=True)
        report("xla int8 dot (cuBLAS)", seconds)
        for spec in args.configs:
            call = functools.partial(ws_gemm, config=WsConfig.parse(spec))
            try:
                got = jax.jit(call)(a, bs[0], prev0)
                wrong = int(jnp.sum(got != want))
                seconds = time_chain(lambda b, prev: call(a, b, prev), bs, (m, n))
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"  ws {spec}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            report(f"ws {spec}" + (f" WRONG ({wrong} differ)" if wrong else ""), seconds)


if __name__ == "__main__":
    main()
