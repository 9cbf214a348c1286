"""Plain jnp/XLA LLM.int8() matmul: the CPU path and the truth every kernel is held to.

The recipe (bitsandbytes 0.45+, functional.py / backends/default/ops.py / csrc/kernels.cu),
written in Flax layout x[M, K] @ w[K, N] (every function also takes the K-major w[N, K],
weight_layout="nk", which is what Int8Weight stores):

1. outlier columns O = {k : any m has |x[m, k]| >= threshold}             (threshold > 0)
2. row scale s_x[m] = max_k |x[m, k]| over elements below the threshold   (kInt8VectorQuant:
   outlier *elements* are excluded, the rest of an outlier column is included)
3. xq = round(x * (127 / s_x)) as int8, half to even, then xq[:, O] = 0; 127 / s_x is
   computed as torch does it (reciprocal, then * 127), see quantization_multiplier
4. acc = xq @ wq in int32
5. y = acc * (s_x[m] * s_w[n]) * (1/127^2) + bias, in float32          (int8_mm_dequant order)
6. y += x[:, O] @ (wq[O, :] * s_w * (1/127)).astype(x.dtype)             (int8_mixed_scaled_mm)

Deliberate differences from bitsandbytes, all towards accuracy:
- bitsandbytes casts x to float16 before step 2; we compute scales and rounding in float32 from
  x as given (bf16 inputs keep their range; fp16 inputs give identical int8 values).
- bitsandbytes casts the int8 result to x.dtype and then adds the outlier stream in x.dtype
  (two roundings); we accumulate the outlier stream in float32 and add it before the one cast.
- An all-zero row (or a row made only of outliers) has s_x = 0; bitsandbytes' default backend
  computes 0 * (127 / 0) = NaN there. We quantize such rows to 0, so they contribute exactly 0.
- Under jit this XLA formulation needs static shapes: its outlier stream gathers at most
  `outlier_capacity` columns. When a batch has more, a lax.cond switches to an exact dense path
  (x masked to the outlier columns @ dequantized w), reported in the returned stats
  (return_stats=True): the same result, never silent truncation. It is not logged from inside
  the program: a host callback there would make every XLA:CPU dispatch of a program holding the
  op wait for its whole run (0.13 -> 18 ms for a 1024^2 matmul), so step-by-step and serving
  use could never dispatch ahead. The GPU kernels have no capacity at all
  (pallas_triton.outliers): any count from 0 to K, read on the device per call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# The shared numerics live in jint8.numerics and the prologue/epilogue concepts in prologue.py;
# importing them here keeps reference.INV_127, reference.rms_norm, reference.InputNorm, ...
# where older callers find them.
from jint8.numerics import (  # noqa: F401  (re-exported)
    GATE_ACTIVATIONS,
    INV_127,
    INV_127_SQ,
    gated_activation,
    quantization_multiplier,
    rms_norm,
)
from jint8.ops.int8_matmul.prologue import (  # noqa: F401  (re-exported)
    InputGate,
    InputNorm,
    OutputGate,
    op_input,
)



class Int8MatmulStats(NamedTuple):
    """What one int8 matmul saw: how many outlier columns, and whether capacity overflowed."""

    num_outlier_columns: jax.Array  # int32 scalar
    capacity_overflow: jax.Array  # bool scalar


def outlier_column_mask(x: jax.Array, threshold: float) -> jax.Array:
    """[M, K] -> [K] bool: columns holding at least one |x| >= threshold.

    Compared in float32, as quantize_rows and the kernels compare: a 16-bit x against a Python
    float would round the threshold to x's dtype first (5.29 to bf16's 5.28125, say), and flag
    columns that the recipe does not."""
    if threshold <= 0:
        return jnp.zeros(x.shape[-1], dtype=bool)
    return jnp.any(jnp.abs(x.astype(jnp.float32)) >= threshold, axis=0)


def row_absmax(x: jax.Array, threshold: float) -> jax.Array:
    """[M, K] -> [M] float32: each row's max |x| over its elements below the threshold (all
    elements when threshold is 0): quantize_rows' row scales (bitsandbytes' row_stats)."""
    magnitude = jnp.abs(x.astype(jnp.float32))
    if threshold > 0:
        magnitude = jnp.where(magnitude >= threshold, 0.0, magnitude)
    return jnp.max(magnitude, axis=-1)


def quantize_rows(x: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Vector-wise (per row) absmax int8 quantization of activations with outlier columns zeroed.

    Args:
      x: [M, K] activations, any float dtype.
      threshold: outlier threshold; 0 disables the decomposition.
    Returns:
      xq: [M, K] int8; row_scales: [M] float32 (bnb's `row_stats`); col_mask: [K] bool.
    """
    xf = x.astype(jnp.float32)
    col_mask = outlier_column_mask(xf, threshold)
    row_scales = row_absmax(xf, threshold)
    return quantize_with(xf, row_scales, col_mask), row_scales, col_mask


def quantize_with(x: jax.Array, row_scales: jax.Array, col_mask: jax.Array) -> jax.Array:
    """quantize_rows' int8 values for given row scales [M] and outlier columns [K] (a sharded
    call's, decided over the whole K and batch: jint8.ops.int8_matmul.sharded)."""
    xq = jnp.round(x.astype(jnp.float32) * quantization_multiplier(row_scales)[:, None])
    return jnp.where(col_mask[None, :], 0.0, xq).astype(jnp.int8)


def _contracting_axis(weight_layout: str) -> int:
    if weight_layout not in ("kn", "nk"):
        raise ValueError(f"weight_layout={weight_layout!r} must be 'kn' or 'nk'")
    return 0 if weight_layout == "kn" else 1


def int8_dot(xq: jax.Array, wq: jax.Array, weight_layout: str = "kn") -> jax.Array:
    """[M, K] int8 @ [K, N] int8 (or [N, K] with weight_layout="nk") -> [M, N] int32, exact."""
    dims = (((1,), (_contracting_axis(weight_layout),)), ((), ()))
    return jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)


def dequantize_accumulator(
    acc: jax.Array, row_scales: jax.Array, col_scales: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """int32 [M, N] -> float32 [M, N] in bitsandbytes' int8_mm_dequant order."""
    y = acc.astype(jnp.float32) * (row_scales[:, None] * col_scales[None, :]) * INV_127_SQ
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def dequantize_weight_rows(wq: jax.Array, col_scales: jax.Array, dtype) -> jax.Array:
    """int8 rows [C, N] of the weight -> dtype, as bnb's int8_vectorwise_dequant then .to(dtype)."""
    return (wq.astype(jnp.float32) * col_scales[None, :] * INV_127).astype(dtype)


def weight_rows(wq: jax.Array, indices: jax.Array | None, weight_layout: str) -> jax.Array:
    """The weight's input-feature rows `indices` (all when None) as [C, N] int8, either layout."""
    rows = wq if weight_layout == "kn" else wq.T
    return rows if indices is None else jnp.take(rows, indices, axis=0)


def outlier_columns(col_mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Static-size list of outlier column indices: ([C] int32 indices, [C] bool valid)."""
    (indices,) = jnp.nonzero(col_mask, size=capacity, fill_value=0)
    valid = jnp.arange(capacity) < jnp.sum(col_mask)
    return indices.astype(jnp.int32), valid


def outlier_stream(
    x: jax.Array,
    wq: jax.Array,
    col_scales: jax.Array,
    col_mask: jax.Array,
    capacity: int,
    weight_layout: str = "kn",
) -> tuple[jax.Array, jax.Array]:
    """x[:, O] @ dequant(wq[O, :]) accumulated in float32; exact whatever the size of O.

    Returns ([M, N] float32 contribution, overflow flag).
    """
    num_outliers = jnp.sum(col_mask, dtype=jnp.int32)
    overflow = num_outliers > capacity

    def gathered(_):
        indices, valid = outlier_columns(col_mask, capacity)
        x_out = jnp.where(valid[None, :], jnp.take(x, indices, axis=1), 0).astype(x.dtype)
        w_out = dequantize_weight_rows(weight_rows(wq, indices, weight_layout), col_scales, x.dtype)
        return _dot_f32(x_out, w_out)

    def dense(_):
        x_out = jnp.where(col_mask[None, :], x, 0).astype(x.dtype)
        w_out = dequantize_weight_rows(weight_rows(wq, None, weight_layout), col_scales, x.dtype)
        return _dot_f32(x_out, w_out)

    if capacity >= x.shape[-1]:  # every column fits: no fallback needed
        return gathered(None), jnp.zeros((), bool)
    return jax.lax.cond(overflow, dense, gathered, None), overflow


def _dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    # Products of 16-bit floats are exact in float32, so upcasting the (already rounded) 16-bit
    # operands equals a 16-bit dot with float32 accumulation; XLA:CPU has no bf16 x bf16 -> f32 dot.
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), preferred_element_type=jnp.float32)


def int8_matmul_reference(
    x: jax.Array,
    wq: jax.Array,
    col_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    threshold: float,
    outlier_capacity: int,
    out_dtype=None,
    weight_layout: str = "kn",
    norm: Optional[InputNorm] = None,
    gate: Optional[InputGate] = None,
    output_gate: Optional[OutputGate] = None,
) -> tuple[jax.Array, Int8MatmulStats]:
    """LLM.int8() matmul, x: [M, K] float, wq: [K, N] (or [N, K], "nk") int8, col_scales: [N]
    float32 -> [M, N]; norm: an RMSNorm applied to x first; gate: x is [M, 2K] = gate | up and
    the recipe runs on act(gate) * up; output_gate: the [M, N] result (in out_dtype) is gate | up
    and [M, N / 2] act(gate) * up is returned."""
    out_dtype = out_dtype or x.dtype
    x = op_input(x, norm, gate)
    xq, row_scales, col_mask = quantize_rows(x, threshold)
    y = dequantize_accumulator(int8_dot(xq, wq, weight_layout), row_scales, col_scales, bias)
    num_outliers = jnp.sum(col_mask, dtype=jnp.int32)
    overflow = jnp.zeros((), bool)
    if threshold > 0:
        contribution, overflow = outlier_stream(
            x, wq, col_scales, col_mask, outlier_capacity, weight_layout
        )
        y = y + contribution
    y = y.astype(out_dtype)
    if output_gate is not None:
        y = output_gate(y)
    return y, Int8MatmulStats(num_outliers, overflow)
