"""int8 GEMM of LLM.int8() with its whole epilogue fused, as a Pallas (Triton lowering) kernel.

One program computes out[block_m, block_n]:
  acc   = xq[rows, :] @ wq[:, cols]                       int8 x int8 -> int32, K in block_k steps
  acc  -= xq[rows, O] @ wq[O, cols]                       exact int32: zeroes the outlier columns
                                                          the activation pass left in xq
  y     = acc * (s_x[rows] * s_w[cols]) * (1/127^2)       bitsandbytes' int8_mm_dequant order
  y    += bias[cols]
  y    += x[rows, O] @ (wq[O, cols] * s_w * (1/127)).astype(x.dtype)      the outlier stream
  out   = y.astype(out_dtype)
O is the static, zero-padded list of outlier columns (capacity C rounded up to 32, the int8 MMA's
K step); the kernel gathers x[:, O], xq[:, O] and the C int8 weight rows itself, so no gathered
copy and no int32 matrix touches HBM. If the batch has more outlier columns than the capacity,
a flag read in the kernel switches the outlier terms to an exact dense sweep over all of K
(columns selected by the [K] flags): the result stays exact to the recipe, no host sync needed.

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

from jint8.ops.int8_matmul.configs import Config
from jint8.ops.int8_matmul.reference import INV_127, INV_127_SQ

# Rows of output tiles walked together so their weight columns stay in L2 (large M only).
_GROUP_M = 8
OUTLIER_SLOT_MULTIPLE = 32  # int8 MMA K step: the outlier list is padded to a multiple of it


def _tile_coordinates(m: int, n: int, config: Config):
    num_pid_m = pl.cdiv(m, config.block_m)
    num_pid_n = pl.cdiv(n, config.block_n)
    pid = pl.program_id(0)
    if num_pid_m == 1:
        return 0, pid
    group_size = _GROUP_M * num_pid_n
    first_m = (pid // group_size) * _GROUP_M
    rows_in_group = jnp.minimum(num_pid_m - first_m, _GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


def _load(ref, rows, cols, row_ok, col_ok, other=0):
    """Load ref[rows, cols] (rows, cols: 1-D index vectors), masked only where needed."""
    mask = None
    if row_ok is not None and col_ok is not None:
        mask = row_ok[:, None] & col_ok[None, :]
    elif row_ok is not None:
        mask = jnp.broadcast_to(row_ok[:, None], (rows.shape[0], cols.shape[0]))
    elif col_ok is not None:
        mask = jnp.broadcast_to(col_ok[None, :], (rows.shape[0], cols.shape[0]))
    if mask is None:
        return plgpu.load(ref.at[rows[:, None], cols[None, :]])
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=other)


def _load_vector(ref, index, ok):
    if ok is None:
        return plgpu.load(ref.at[index])
    return plgpu.load(ref.at[index], mask=ok, other=0)


def _dequantize_rows(w_int8, col_scales, dtype):
    # reference.dequantize_weight_rows: float32 products, then one cast to the activation dtype.
    return (w_int8.astype(jnp.float32) * col_scales[None, :] * INV_127).astype(dtype)


def _gemm_kernel(
    xq_ref, w_ref, row_scales_ref, col_scales_ref, bias_ref, x_ref,
    slots_ref, slot_valid_ref, col_flags_ref, overflow_ref, o_ref,
    *, config: Config, has_bias: bool, has_outliers: bool, dense_fallback: bool,
):
    m, k = xq_ref.shape
    n = w_ref.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    pid_m, pid_n = _tile_coordinates(m, n, config)
    split = pl.program_id(1)
    rows = pid_m * bm + jnp.arange(bm)
    cols = pid_n * bn + jnp.arange(bn)
    row_ok = rows < m if m % bm else None
    col_ok = cols < n if n % bn else None

    k_steps = pl.cdiv(k, bk)
    steps_per_split = pl.cdiv(k_steps, config.split_k)
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, k_steps)

    def k_step(i, acc):
        ks = i * bk + jnp.arange(bk)
        k_ok = ks < k if k % bk else None
        a = _load(xq_ref, rows, ks, row_ok, k_ok)
        b = _load(w_ref, ks, cols, k_ok, col_ok)
        return acc + jnp.dot(a, b, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(first_step, last_step, k_step, jnp.zeros((bm, bn), jnp.int32))

    col_scales = _load_vector(col_scales_ref, cols, col_ok)
    if has_outliers:
        outlier_terms = functools.partial(
            _outlier_terms, xq_ref, w_ref, x_ref, slots_ref, slot_valid_ref, col_flags_ref,
            overflow_ref, rows, cols, row_ok, col_ok, col_scales,
            config=config, dense_fallback=dense_fallback,
        )
        zero_terms = lambda: (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((bm, bn), jnp.float32))
        if config.split_k == 1:
            correction, stream = outlier_terms()
        else:
            correction, stream = jax.lax.cond(split == 0, outlier_terms, zero_terms)
        acc = acc - correction

    row_scales = _load_vector(row_scales_ref, rows, row_ok)
    y = acc.astype(jnp.float32) * (row_scales[:, None] * col_scales[None, :]) * INV_127_SQ
    if has_bias:
        bias = _load_vector(bias_ref, cols, col_ok).astype(jnp.float32)
        if config.split_k > 1:
            bias = jnp.where(split == 0, bias, 0.0)
        y = y + bias[None, :]
    if has_outliers:
        y = y + stream

    mask = None
    if row_ok is not None or col_ok is not None:
        mask = (rows < m)[:, None] & (cols < n)[None, :]
    if config.split_k == 1:
        plgpu.store(o_ref.at[rows[:, None], cols[None, :]], y.astype(o_ref.dtype), mask=mask)
    else:
        plgpu.store(o_ref.at[split, rows[:, None], cols[None, :]], y, mask=mask)


def _outlier_terms(
    xq_ref, w_ref, x_ref, slots_ref, slot_valid_ref, col_flags_ref, overflow_ref,
    rows, cols, row_ok, col_ok, col_scales, *, config, dense_fallback,
):
    """(int32 correction, float32 outlier stream) of one output tile."""

    def gathered():
        slots = plgpu.load(slots_ref.at[jnp.arange(slots_ref.shape[0])])
        valid = plgpu.load(slot_valid_ref.at[jnp.arange(slots_ref.shape[0])]) > 0
        rows_valid = valid[None, :] if row_ok is None else row_ok[:, None] & valid[None, :]
        xq_o = plgpu.load(xq_ref.at[rows[:, None], slots[None, :]], mask=rows_valid, other=0)
        x_o = plgpu.load(x_ref.at[rows[:, None], slots[None, :]], mask=rows_valid, other=0)
        w_o = _load(w_ref, slots, cols, valid, col_ok)
        correction = jnp.dot(xq_o, w_o, preferred_element_type=jnp.int32)
        w_deq = _dequantize_rows(w_o, col_scales, x_ref.dtype)
        return correction, jnp.dot(x_o, w_deq, preferred_element_type=jnp.float32)

    if not dense_fallback:
        return gathered()

    def dense():
        # Capacity overflow: every flagged column of K, in block_k steps (a second read of W).
        k = xq_ref.shape[1]
        bm, bn, bk = config.block_m, config.block_n, config.block_k

        def k_step(i, carry):
            correction, stream = carry
            ks = i * bk + jnp.arange(bk)
            flagged = plgpu.load(col_flags_ref.at[ks], mask=ks < k, other=0) > 0
            xq = _load(xq_ref, rows, ks, row_ok, flagged)
            x = _load(x_ref, rows, ks, row_ok, flagged)
            w = _load(w_ref, ks, cols, flagged, col_ok)
            correction = correction + jnp.dot(xq, w, preferred_element_type=jnp.int32)
            w_deq = _dequantize_rows(w, col_scales, x_ref.dtype)
            return correction, stream + jnp.dot(x, w_deq, preferred_element_type=jnp.float32)

        init = (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((bm, bn), jnp.float32))
        return jax.lax.fori_loop(0, pl.cdiv(k, bk), k_step, init)

    overflow = plgpu.load(overflow_ref.at[jnp.arange(1)])[0] > 0
    return jax.lax.cond(overflow, dense, gathered)


@functools.partial(
    jax.jit,
    static_argnames=("config", "out_dtype", "has_bias", "has_outliers", "dense_fallback",
                     "interpret"),
)
def int8_gemm(
    xq, wq, row_scales, col_scales, bias, x, slots, slot_valid, col_flags, overflow,
    *, config: Config, out_dtype, has_bias: bool, has_outliers: bool, dense_fallback: bool,
    interpret: bool = False,
):
    """The fused GEMM.

    Args:
      xq: [M, K] int8 from the activation pass (outlier columns not yet zeroed).
      wq: [K, N] int8; row_scales: [M] f32; col_scales: [N] f32; bias: [N] (read if has_bias).
      x: [M, K] the original activations (outlier stream and overflow sweep read them).
      slots: [Cp] int32 outlier column indices, Cp a multiple of 32; slot_valid: [Cp] int32.
      col_flags: [K] int32, nonzero on outlier columns; overflow: [1] int32, nonzero when the
        batch has more outlier columns than the capacity (then the dense sweep runs).
    Returns:
      [M, N] out_dtype.
    """
    m, k = xq.shape
    n = wq.shape[1]
    tiles = pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)
    if config.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((config.split_k, m, n), jnp.float32)
    kernel = functools.partial(
        _gemm_kernel, config=config, has_bias=has_bias, has_outliers=has_outliers,
        dense_fallback=dense_fallback,
    )
    out = pl.pallas_call(
        kernel,
        grid=(tiles, config.split_k),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="jint8_int8_gemm",
    )(xq, wq, row_scales, col_scales, bias, x, slots, slot_valid, col_flags, overflow)
    if config.split_k == 1:
        return out
    return out.sum(axis=0).astype(out_dtype)
