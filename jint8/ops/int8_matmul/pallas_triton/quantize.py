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
from jint8.ops.int8_matmul.pallas_triton.outliers import form_slots, slots_shapes
from jint8.ops.int8_matmul.pallas_triton.common import (  # noqa: F401 (round_half_even re-exported)
    inverse_scale, round_half_even,
)

# Flags per step of the last program's running prefix sum (outliers.form_slots): this kernel's
# few warps hold one step at a time, for any K.
SLOTS_STEP = 2048


def _flag_columns(flags_ref, start, column_hit, *, block_cols, interpret):
    """flags[start:start+block_cols] = max(flags, column_hit), atomically across programs;
    returns the old flags on the column_hit lanes (0 elsewhere): a value that exists only once
    these atomics have completed (_quantize_kernel's ticket waits on it).

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
        old = atomic(flags_ref, index, column_hit, mask=mask)
    else:
        old = atomic(flags_ref.at[index], column_hit, mask=mask)
    return jnp.where(column_hit > 0, old, 0)  # masked-off lanes return no defined value


def _atomic_add(ref, index, value):
    if "idx" in inspect.signature(plgpu.atomic_add).parameters:  # jax 0.10: (ref, idx, val)
        return plgpu.atomic_add(ref, index, value)
    return plgpu.atomic_add(ref.at[index], value)


def _quantize_kernel(
    x_ref, flags_in_ref, xq_ref, scales_ref, flags_ref, *slot_refs, threshold, config,
    gathered_max, interpret
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
        """Row absmax of a chunk over its non-outlier elements; flags its outlier columns and
        returns the flag atomics' completion token (_flag_columns)."""
        magnitude = jnp.abs(x)
        token = jnp.int32(0)
        if threshold > 0:
            is_outlier = magnitude >= threshold
            magnitude = jnp.where(is_outlier, 0.0, magnitude)
            column_hit = jnp.max(is_outlier.astype(jnp.int32), axis=0)
            old = _flag_columns(flags_ref, start, column_hit, block_cols=config.block_cols,
                                interpret=interpret)
            token = jnp.max(old)
        return jnp.max(magnitude, axis=1), token

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
        row_max, token = absmax(x, cols, 0)
    else:
        def absmax_sweep(i, carry):
            row_max, token = carry
            cols, _, _, x = load_chunk(i)
            chunk_max, chunk_token = absmax(x, cols, i * config.block_cols)
            return jnp.maximum(row_max, chunk_max), jnp.maximum(token, chunk_token)

        row_max, token = jax.lax.fori_loop(
            0, num_chunks, absmax_sweep,
            (jnp.zeros((config.block_rows,), jnp.float32), jnp.int32(0)))
    plgpu.store(scales_ref.at[rows], row_max, mask=row_ok)
    if num_chunks == 1:
        quantize(x, cols, mask, row_max)
    else:
        def quantize_sweep(i, carry):
            cols, _, mask, x = load_chunk(i)
            quantize(x, cols, mask, row_max)
            return carry

        jax.lax.fori_loop(0, num_chunks, quantize_sweep, 0)
    if slot_refs:
        _last_program_forms_slots(flags_ref, *slot_refs, token, k=k, gathered_max=gathered_max,
                                  interpret=interpret)


def _last_program_forms_slots(flags_ref, slots_ref, count_ref, dense_ref, token, *, k,
                              gathered_max, interpret):
    """The program that finishes flagging last forms the slot list (outliers.form_slots), so
    the routes need no separate slots kernel (one launch fewer per matmul).

    Each program takes a ticket, an atomic add on the counter word after the flags
    (flags_ref[padded K], zero on entry). The add's operand is 1 + min(token, 0) = 1 with a data
    dependence on every flag atomic of the program (token is the max of their returned values,
    0 or 1), so no program's ticket is taken before its flags are in L2, and the one that draws
    the last ticket sees every program's flags; it reads them with volatile loads. Atomics are
    acquire-release at GPU scope in the Triton lowering. Interpret mode runs the programs one
    after another, so the last program there has every flag too."""
    programs = pl.num_programs(0)
    counter = jnp.asarray(flags_ref.shape[0] - 1, jnp.int32)
    ticket = _atomic_add(flags_ref, (counter,), 1 + jnp.minimum(token, 0))

    @pl.when(ticket == programs - 1)
    def _():
        form_slots(flags_ref, slots_ref, count_ref, dense_ref, k=k, gathered_max=gathered_max,
                   step=SLOTS_STEP, volatile=not interpret)


@functools.partial(jax.jit, static_argnames=("threshold", "config", "interpret", "slots_for"))
def quantize_rows_unmasked(
    x: jax.Array, *, threshold: float, config: QuantizeConfig, interpret: bool = False,
    slots_for=None,
):
    """The kernel's raw outputs.

    Args:
      x: [M, K] float activations.
      slots_for: None, or G (outliers.gather_slots) to also form the slot list of the outlier
        columns in the same launch (threshold > 0): the last program to finish flagging
        writes it (_last_program_forms_slots).
    Returns:
      xq: [M, K] int8, outlier elements 0 but outlier columns not yet zeroed;
      row_scales: [M] float32; column_flags: [K] int32, nonzero where a column holds an outlier;
      with slots_for: column_flags is the kernel's whole buffer, [padded K + 1] with the K flags
      first (no slice: XLA would copy it with a kernel of its own, and the GEMM reads the
      first K only), and also (slots [K + 1], count [1], dense [1]) int32 as
      outliers.outlier_operands forms them (dense: count > G).
    """
    m, k = x.shape
    with_slots = slots_for is not None
    if with_slots and not threshold > 0:
        raise ValueError(f"quantize_rows_unmasked: slots_for needs threshold > 0, got {threshold}")
    padded_k = pl.cdiv(k, config.block_cols) * config.block_cols
    kernel = functools.partial(
        _quantize_kernel, threshold=threshold, config=config, interpret=interpret,
        gathered_max=slots_for if with_slots else 0,
    )
    # flags: padded to whole chunks, then one counter word for the programs' tickets
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, config.block_rows),),
        out_shape=(
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((padded_k + 1,), jnp.int32),
            *(slots_shapes(k) if with_slots else ()),
        ),
        input_output_aliases={1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="jint8_quantize_rows",
    )(x, jnp.zeros((padded_k + 1,), jnp.int32))
    xq, row_scales, flags = outs[:3]
    if with_slots:
        return xq, row_scales, flags, tuple(outs[3:])
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
