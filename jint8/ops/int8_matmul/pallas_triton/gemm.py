"""int8 GEMM of LLM.int8() with its whole epilogue fused, as a Pallas (Triton lowering) kernel.

One program computes out[block_m, block_n]:
  acc   = xq[rows, :] @ wq[:, cols]                       int8 x int8 -> int32, K in block_k steps
                                                          (xq's columns in O arrive zeroed)
  y     = acc * (s_x[rows] * s_w[cols]) * (1/127^2)       bitsandbytes' int8_mm_dequant order
  y    += bias[cols]
  y    += x[rows, O] @ (wq[O, cols] * s_w * (1/127)).astype(x.dtype)      the outlier stream
  out   = y.astype(out_dtype)
O is the list of all the batch's outlier columns, any number from 0 to K, with no capacity: for
|O| <= G (pallas_triton.outliers.gather_slots) x[:, O] and O's int8 weight rows come compacted
from pallas_triton.outliers and the stream runs ceil(|O| / SLOT_BLOCK) steps over them, a loop
bound the kernel reads from the device count; for |O| > G the stream sweeps all of K with x
masked to the flagged columns, reading the weight in place (a flag read in the kernel picks
the way: no lax.cond outside, no host sync, no recompilation when |O| changes). xq arrives
with the columns of O zeroed, so the K loop stays a pure int8 dot that Triton pipelines and no
int32 correction is needed. (Doing the outlier work inside the int8 K loop, in the steps that
hold outlier columns, put a branch in the loop that stopped the pipelining: 1.4x slower at
M = 1..16.)

weight_layout="nk" takes the weight transposed, wt[N, K] (bitsandbytes' layout, K-major):
Triton's int8 MMAs (wgmma) want both operands K-major, and with wq[K, N] they fall back to a
slow path (2-4x slower from M = 64 up; docs/decisions.md D1, which also records why the
transposed-tile variant was dropped).

split_k > 1 (skinny M): program (tile, s) sums K steps [s*steps/S, (s+1)*steps/S); split 0 alone
adds the correction, bias and outlier stream; the wrapper sums the float32 partials
[S, M, N] (each is its int32 partial times the same scale: the float sum differs from scaling
the int32 total by float32 rounding only, well inside the tests' bound).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops._pallas_grid import grouped_tile
from jint8.ops.int8_matmul.configs import GemmConfig
from jint8.ops.int8_matmul.pallas_triton.common import (
    NO_PROBE, Probe, Tile, dequantize, dot, launch, load_tile, load_vector, load_weight, stream_dot,
)
from jint8.ops.int8_matmul.pallas_triton.outliers import SLOT_BLOCK
from jint8.numerics import INV_127

# Columns per step of the dense outlier sweep in the epilogue-only kernel (_outlier_terms).
EPILOGUE_SWEEP_STEP = 128


def _gemm_kernel(
    xq_ref, w_ref, row_scales_ref, col_scales_ref, bias_ref, x_ref,
    x_o_ref, w_o_ref, col_flags_ref, count_ref, dense_ref, *accumulator_and_out,
    config: GemmConfig, has_bias: bool, has_outliers: bool, dense_fallback: bool,
    accumulator_only: bool,
):
    m, k = xq_ref.shape
    nk_layout = config.weight_layout == "nk"
    n = w_ref.shape[0] if nk_layout else w_ref.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    pid_m, pid_n = grouped_tile(m, n, config.block_m, config.block_n)
    split = pl.program_id(1)
    tile = Tile(rows=pid_m * bm + jnp.arange(bm), cols=pid_n * bn + jnp.arange(bn), m=m, n=n)

    k_steps = pl.cdiv(k, bk)
    steps_per_split = pl.cdiv(k_steps, config.split_k)
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, k_steps)

    def k_step(i, acc):
        ks = i * bk + jnp.arange(bk)
        k_ok = ks < k if k % bk else None
        a = load_tile(xq_ref, tile.rows, ks, tile.row_ok, k_ok)
        b = load_weight(w_ref, ks, tile, k_ok, nk_layout)
        return acc + dot(a, b, b_transposed=nk_layout, out_dtype=jnp.int32)

    *accumulator_ref, out = accumulator_and_out
    if accumulator_ref:  # epilogue only: XLA's int8 GEMM computed xq @ wq (int8_gemm docstring)
        acc = load_tile(accumulator_ref[0], tile.rows, tile.cols, tile.row_ok, tile.col_ok)
    else:
        acc = jax.lax.fori_loop(first_step, last_step, k_step, jnp.zeros((bm, bn), jnp.int32))

    col_scales = load_vector(col_scales_ref, tile.cols, tile.col_ok)
    if has_outliers:
        outlier_terms = functools.partial(
            _outlier_terms, x_ref, w_ref, x_o_ref, w_o_ref, col_flags_ref, count_ref,
            dense_ref, tile, col_scales, config=config, dense_fallback=dense_fallback,
            sweep_step=EPILOGUE_SWEEP_STEP if accumulator_ref else SLOT_BLOCK,
        )
        if config.split_k == 1:
            stream = outlier_terms()
        else:  # split 0 alone adds the stream
            stream = jax.lax.cond(split == 0, outlier_terms,
                                  lambda: jnp.zeros((bm, bn), jnp.float32))

    if accumulator_only:  # checks only: this program's exact int32 xq[:, not O] @ wq
        out.store(acc, tile, split)
        return

    row_scales = load_vector(row_scales_ref, tile.rows, tile.row_ok)
    dequantize_store(out, acc, row_scales, col_scales, bias_ref if has_bias else None,
                     stream if has_outliers else None, tile, split, split_k=config.split_k)


def dequantize_store(out, acc, row_scales, col_scales, bias_ref, stream, tile, split, *,
                     split_k: int):
    """The epilogue both GEMM kernels end with: dequantize(...), stored by `out` (Output) for
    this tile and split."""
    out.store(dequantize(acc, row_scales, col_scales, bias_ref, stream, tile, split,
                         split_k=split_k), tile, split)


def _outlier_terms(x_ref, w_ref, x_o_ref, w_o_ref, col_flags_ref, count_ref, dense_ref, tile,
                   col_scales, *, config, dense_fallback, sweep_step):
    """The float32 outlier stream x[rows, O] @ dequant(wq[O, cols]) of one output tile, for any
    |O| from 0 to K: over the compacted slots in SLOT_BLOCK steps, as many as the batch's count
    needs (a loop bound read on the device), or, when the batch had more outlier columns than
    were gathered (pallas_triton.outliers: `dense`), over all of K with x masked to the flagged
    columns, reading the weight tiles in place. xq's columns in O arrive zeroed, so the int32
    accumulator needs no correction either way.

    The loops multiply x by the int8 weight values themselves (exact in x's 16-bit dtype, and
    each product exact in float32) and scale each output column by s_w / 127 once after the
    loop, as the fused kernel does: a per-element dequantize-and-round of every weight tile in
    the loop cost more ALU than the MMA it feeds. So the weight's rounding to x.dtype that the
    recipe applies is skipped (checks.weight_rounding bounds the difference).

    The dense sweep loads x unmasked by the flags and zeroes the unflagged columns after the
    load: a load masked by the flags (a data-dependent mask) made the sweep 2-3x slower at every
    M (H100, 8192x28672, all K flagged: M = 256 1.84 -> 1.08 ms, docs/decisions.md D18). It
    steps sweep_step columns: EPILOGUE_SWEEP_STEP in the epilogue-only kernel (no K loop to
    share registers with), SLOT_BLOCK after a K loop (128 there slowed the no-outlier case)."""
    nk_layout = config.weight_layout == "nk"
    rows, row_ok = tile.rows, tile.row_ok
    bm, bn = config.block_m, config.block_n
    first = jnp.arange(1)

    def gathered(_):
        count = plgpu.load(count_ref.at[first])[0]

        def slot_step(j, stream):
            slot = j * SLOT_BLOCK + jnp.arange(SLOT_BLOCK)
            x_o = load_tile(x_o_ref, rows, slot, row_ok, None)
            w_o = load_weight(w_o_ref, slot, tile, None, nk_layout)
            return stream + stream_dot(x_o, w_o.astype(x_ref.dtype), nk_layout)

        return jax.lax.fori_loop(0, pl.cdiv(count, SLOT_BLOCK), slot_step,
                                 jnp.zeros((bm, bn), jnp.float32))

    def dense(_):
        k = x_ref.shape[1]

        def k_step(i, stream):
            ks = i * sweep_step + jnp.arange(sweep_step)
            k_ok = ks < k if k % sweep_step else None
            flagged = plgpu.load(col_flags_ref.at[ks], mask=ks < k, other=0) > 0
            x = jnp.where(flagged[None, :], load_tile(x_ref, rows, ks, row_ok, k_ok), 0)
            w = load_weight(w_ref, ks, tile, k_ok, nk_layout)
            return stream + stream_dot(x, w.astype(x_ref.dtype), nk_layout)

        return jax.lax.fori_loop(0, pl.cdiv(k, sweep_step), k_step,
                                 jnp.zeros((bm, bn), jnp.float32))

    weight_scale = (col_scales * INV_127)[None, :]  # reference.dequantize_weight_rows' factors
    if not dense_fallback:
        return gathered(None) * weight_scale
    is_dense = plgpu.load(dense_ref.at[first])[0] > 0
    return jax.lax.cond(is_dense, dense, gathered, None) * weight_scale


@functools.partial(
    jax.jit,
    static_argnames=("config", "out_dtype", "has_bias", "has_outliers", "dense_fallback",
                     "probe", "interpret"),
)
def int8_gemm(
    xq, w, row_scales, col_scales, bias, x, x_o, w_o, col_flags, count, dense,
    accumulator=None, *, config: GemmConfig, out_dtype, has_bias: bool, has_outliers: bool,
    dense_fallback: bool, probe: Probe = NO_PROBE, interpret: bool = False,
):
    """The fused GEMM.

    Args:
      xq: [M, K] int8 from the activation pass, every outlier column zeroed
        (pallas_triton.outliers).
      w: [K, N] int8 (config.weight_layout "kn") or [N, K] ("nk").
      row_scales: [M] f32; col_scales: [N] f32; bias: [N] (read only if has_bias).
      x: [M, K] the original activations (the dense outlier sweep reads them).
      x_o, w_o: the compacted outlier operands (pallas_triton.outliers.OutlierOperands):
        x[:, O] [M, G] and the weight rows [G, N] ("kn") or [N, G] ("nk") int8, zero past the
        count in its last SLOT_BLOCK chunk; G a multiple of SLOT_BLOCK. Read only if
        has_outliers.
      col_flags: [K] int32, nonzero on outlier columns; count: [1] int32, the number of them;
        dense: [1] int32, nonzero when count > G (x_o, w_o unwritten: the dense sweep runs).
      dense_fallback: False when G covers all of K (the dense sweep is not compiled).
      accumulator: optional [M, N] int32 xq @ w computed elsewhere (XLA's int8 GEMM, the
        "xla_gemm" route): the kernel then runs no K loop, only the epilogue on it (scales,
        bias, outlier stream, cast). Needs config.split_k == 1.
      probe: the checks' instruments (common.Probe; testing.py): the int32 accumulator
        xq[:, not O] @ wq instead of the output, a poisoned output buffer.
    Returns:
      [M, N] out_dtype (int32 with probe.accumulator_only).
    """
    m, k = xq.shape
    n = w.shape[0] if config.weight_layout == "nk" else w.shape[1]
    tiles = pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)
    kernel = functools.partial(
        _gemm_kernel, config=config, has_bias=has_bias, has_outliers=has_outliers,
        dense_fallback=dense_fallback, accumulator_only=probe.accumulator_only,
    )
    operands = [xq, w, row_scales, col_scales, bias, x, x_o, w_o, col_flags, count, dense]
    if accumulator is not None:
        if config.split_k != 1 or accumulator.shape != (m, n) or accumulator.dtype != jnp.int32:
            raise ValueError(
                f"int8_gemm: accumulator must be int32 {(m, n)} with split_k=1, got "
                f"{accumulator.dtype} {accumulator.shape}, split_k={config.split_k}")
        operands.append(accumulator)
    return launch(kernel, operands, grid=(tiles, config.split_k), m=m, n=n, config=config,
                  out_dtype=out_dtype, probe=probe, interpret=interpret, name="jint8_int8_gemm")


