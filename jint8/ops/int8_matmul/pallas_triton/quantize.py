"""Activation pass of LLM.int8() as one Pallas (Triton lowering) kernel: x[M, K] -> int8.

Per row block, two sweeps over K (one load when the row block fits one chunk):
  1. absmax of |x| over elements below the threshold (bitsandbytes' kInt8VectorQuant excludes
     outlier *elements*), and the outlier-column flags of this row block;
  2. xq = round_half_even(x * (127 / s_x)), outlier elements set to 0.
Sweep 2 re-reads the row block that sweep 1 just read: a block is block_rows * K * 2 bytes
(64 KiB for 4 rows of K=8192 in bf16), so it is still in L2 and X crosses HBM once.

The column mask is a reduction over *all* rows, so no row block can know it while it writes xq.
Instead of a second pass that zeroes xq[:, O] (or a grid-wide barrier), each program ORs its
flags into a [K] int32 vector with atomics masked to the flagged lanes (real activations have a
handful of outlier columns, so a handful of atomics per program). xq keeps the *non-outlier*
elements of outlier columns: the routes' next kernel (pallas_triton.outliers) zeroes the
columns of the outlier slot list in place, and on a capacity overflow the GEMM subtracts the
rest exactly in int32, which keeps the GEMM's inner loop a pure int8 dot. `quantize_rows` below
applies the mask for callers that want reference.quantize_rows' exact outputs.

Bit-equal to reference.quantize_rows on the same device: 127 / s is rounded as XLA rounds it
there (inverse_scale; neither XLA:GPU nor XLA:CPU gives the IEEE quotient, and bf16 inputs hit
the exact ties x = s/2 where one ulp of 127/s flips the rounded value). Triton has
no lowering for round-half-even, so the kernel uses PTX cvt.rni.f32.f32 (what XLA:GPU emits for
jnp.round) through inline asm; under interpret=True, jnp.round.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.int8_matmul.configs import QuantizeConfig
from jint8.ops.int8_matmul.pallas_triton.common import (  # noqa: F401 (round_half_even re-exported)
    inverse_scale, round_half_even,
)


def _flag_columns(flags_ref, start, column_hit, *, block_cols, interpret):
    """flags[start:start+block_cols] = max(flags, column_hit), atomically across programs.

    On the GPU only the flagged lanes issue an atomic (real activations have a few outlier
    columns). Interpret mode's atomic discharge takes no mask; it needs none, since programs run
    one after another there. flags is padded to whole chunks so the slice is always in bounds.
    """
    index = (pl.ds(start, block_cols),)
    # Interpret mode discharges only add/max/min without a mask; the Triton lowering of jax
    # 0.10 takes integer-tensor max for a float op and fails, while `or` lowers for ints.
    # On 0/1 flags max and or agree.
    if interpret:
        atomic, mask = plgpu.atomic_max, None
    else:
        atomic, mask = plgpu.atomic_or, column_hit > 0
    if "idx" in inspect.signature(atomic).parameters:  # jax 0.10: (ref, idx, val)
        return atomic(flags_ref, index, column_hit, mask=mask)
    return atomic(flags_ref.at[index], column_hit, mask=mask)


def _quantize_kernel(
    x_ref, flags_in_ref, xq_ref, scales_ref, flags_ref, *, threshold, config, interpret
):
    del flags_in_ref  # aliased to flags_ref: zeros on entry
    m, k = x_ref.shape
    rows = pl.program_id(0) * config.block_rows + jnp.arange(config.block_rows)
    row_ok = rows < m
    num_chunks = pl.cdiv(k, config.block_cols)

    def load_chunk(i):
        cols = i * config.block_cols + jnp.arange(config.block_cols)
        col_ok = cols < k
        mask = row_ok[:, None] & col_ok[None, :]
        x = plgpu.load(
            x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0,
            eviction_policy="evict_last",
        )
        return cols, col_ok, mask, x.astype(jnp.float32)

    def absmax(x, cols, start):
        """Row absmax of a chunk over its non-outlier elements; flags its outlier columns."""
        magnitude = jnp.abs(x)
        if threshold > 0:
            is_outlier = magnitude >= threshold
            magnitude = jnp.where(is_outlier, 0.0, magnitude)
            column_hit = jnp.max(is_outlier.astype(jnp.int32), axis=0)
            _flag_columns(flags_ref, start, column_hit, block_cols=config.block_cols,
                          interpret=interpret)
        return jnp.max(magnitude, axis=1)

    def quantize(x, cols, mask, row_max):
        # reference.quantize_rows: inv = 127 / s, 0 for an all-zero (or all-outlier) row.
        safe = jnp.where(row_max > 0, row_max, 1.0)
        inv = jnp.where(row_max > 0, inverse_scale(safe, interpret=interpret), 0.0)
        q = round_half_even(x * inv[:, None], interpret=interpret)
        if threshold > 0:
            q = jnp.where(jnp.abs(x) >= threshold, 0.0, q)
        plgpu.store(xq_ref.at[rows[:, None], cols[None, :]], q.astype(jnp.int8), mask=mask)

    if num_chunks == 1:  # the whole row block fits one chunk: load it once
        cols, _, mask, x = load_chunk(0)
        row_max = absmax(x, cols, 0)
        plgpu.store(scales_ref.at[rows], row_max, mask=row_ok)
        quantize(x, cols, mask, row_max)
        return

    def absmax_sweep(i, row_max):
        cols, _, _, x = load_chunk(i)
        return jnp.maximum(row_max, absmax(x, cols, i * config.block_cols))

    row_max = jax.lax.fori_loop(
        0, num_chunks, absmax_sweep, jnp.zeros((config.block_rows,), jnp.float32)
    )
    plgpu.store(scales_ref.at[rows], row_max, mask=row_ok)

    def quantize_sweep(i, carry):
        cols, _, mask, x = load_chunk(i)
        quantize(x, cols, mask, row_max)
        return carry

    jax.lax.fori_loop(0, num_chunks, quantize_sweep, 0)


@functools.partial(jax.jit, static_argnames=("threshold", "config", "interpret"))
def quantize_rows_unmasked(
    x: jax.Array, *, threshold: float, config: QuantizeConfig, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel's raw outputs.

    Args:
      x: [M, K] float activations.
    Returns:
      xq: [M, K] int8, outlier elements 0 but outlier columns not yet zeroed;
      row_scales: [M] float32; column_flags: [K] int32, nonzero where a column holds an outlier.
    """
    m, k = x.shape
    padded_k = pl.cdiv(k, config.block_cols) * config.block_cols
    kernel = functools.partial(
        _quantize_kernel, threshold=threshold, config=config, interpret=interpret
    )
    xq, row_scales, flags = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, config.block_rows),),
        out_shape=(
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((padded_k,), jnp.int32),
        ),
        input_output_aliases={1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="jint8_quantize_rows",
    )(x, jnp.zeros((padded_k,), jnp.int32))
    return xq, row_scales, flags[:k]


def quantize_rows(
    x: jax.Array, threshold: float, *, config: QuantizeConfig, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same outputs as reference.quantize_rows (xq with outlier columns zeroed, scales, mask)."""
    xq, row_scales, flags = quantize_rows_unmasked(
        x, threshold=float(threshold), config=config, interpret=interpret
    )
    col_mask = flags > 0
    return jnp.where(col_mask[None, :], jnp.int8(0), xq), row_scales, col_mask
