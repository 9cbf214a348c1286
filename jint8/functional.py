"""bitsandbytes' LLM.int8() and 4-bit building blocks under bitsandbytes' names, in JAX.

A drop-in surface for bitsandbytes users, thin over jint8.ops.int8_matmul.reference (the code the
layers run). Layouts follow bitsandbytes, not Flax: weights are row-major [N, K] (torch Linear),
`int8_linear_matmul(A, B)` computes A @ B.T.

Deliberate differences from bitsandbytes 0.50 (functional.py, backends/default/ops.py):
- outlier columns: bitsandbytes returns a variable-length index tensor; under jit shapes are
  static, so we return `outlier_capacity` indices (default under jit: K, which always fits)
  padded with -1, sorted ascending as torch.argwhere gives. Eagerly without a capacity the
  exact-length list is returned. More outlier columns than the capacity: an error eagerly, a
  logged warning under jit (the layers' int8_matmul instead falls back exactly).
- `int8_mixed_scaled_mm` adds the outlier stream in float32 before the one cast to A.dtype;
  bitsandbytes casts the int8 result to A.dtype first and adds in A.dtype (two roundings).
- an all-zero row: bitsandbytes computes round(0 * 127/0) = NaN and casts it to int8 (0 on x86);
  we define it as 0 explicitly, which is what bitsandbytes returns there.
- bitsandbytes mutates A in place while quantizing (and restores it); JAX arrays are immutable.
- 4-bit (thin over jint8.quant4): the quant state is an Int4Weight (its packed field is the
  returned codes); no absmax=/out= buffers, so dequantize_4bit without a quant state takes
  shape= and dtype= where bitsandbytes reads them off `out`. bitsandbytes' CPU kernel returns a
  1-D tensor as [1, n] and a [1, m] packed input transposed; here the result always has the
  quantized shape. compress_statistics' offset is jnp's float32 mean of the absmax, which can
  differ from torch's in the last bit (summation order; see jint8.quant4.quantize_4bit).
"""

from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp

from jint8 import quant4
from jint8.errors import InvalidConfigError
from jint8.ops.int8_matmul.reference import (
    INV_127,
    dequantize_accumulator,
    int8_dot,
    outlier_stream,
    quantize_rows,
)

_logger = logging.getLogger("jint8")


def _rows(A: jax.Array) -> jax.Array:
    return A.reshape(-1, A.shape[-1])


def _column_indices(col_mask: jax.Array, outlier_capacity: Optional[int]) -> jax.Array:
    traced = isinstance(col_mask, jax.core.Tracer)
    if outlier_capacity is None and not traced:
        return jnp.nonzero(col_mask)[0].astype(jnp.int32)
    capacity = col_mask.shape[0] if outlier_capacity is None else outlier_capacity
    count = jnp.sum(col_mask)
    if not traced and int(count) > capacity:
        raise InvalidConfigError(
            f"int8_vectorwise_quant: {int(count)} outlier columns exceed outlier_capacity={capacity}"
        )
    if traced and capacity < col_mask.shape[0]:
        jax.debug.callback(_warn_truncated, count, capacity)
    (indices,) = jnp.nonzero(col_mask, size=capacity, fill_value=-1)
    return indices.astype(jnp.int32)


def _warn_truncated(count, capacity):
    if int(count) > capacity:
        _logger.warning(
            "int8_vectorwise_quant: %d outlier columns exceed outlier_capacity=%d; the returned "
            "list is truncated and int8_mixed_scaled_mm will miss columns. Raise the capacity.",
            int(count),
            capacity,
        )


def int8_vectorwise_quant(A: jax.Array, threshold: float = 0.0, *, outlier_capacity: Optional[int] = None):
    """A [..., K] -> (int8 rows [rows, K], row_stats float32 [rows], outlier_cols int32 or None).

    outlier_cols is None when threshold == 0, as in bitsandbytes.
    """
    out_row, row_stats, col_mask = quantize_rows(_rows(A), threshold)
    outlier_cols = _column_indices(col_mask, outlier_capacity) if threshold > 0 else None
    return out_row, row_stats, outlier_cols


def int8_vectorwise_dequant(A: jax.Array, stats: jax.Array) -> jax.Array:
    """int8 [rows, K] with per-row absmax stats -> float32 (A * stats / 127)."""
    return A.astype(jnp.float32) * stats.reshape(-1, 1) * INV_127


def int8_linear_matmul(A: jax.Array, B: jax.Array) -> jax.Array:
    """int8 A [M, K] @ int8 B[N, K].T -> int32 [M, N], exact."""
    return int8_dot(_rows(A), B, "nk")


def int8_mm_dequant(
    A: jax.Array,
    row_stats: jax.Array,
    col_stats: jax.Array,
    dtype=jnp.float16,
    bias: Optional[jax.Array] = None,
) -> jax.Array:
    """int32 [M, N] -> dtype: A * (row_stats * col_stats) / 127^2 + bias, in bitsandbytes' order."""
    out = dequantize_accumulator(_rows(A), row_stats.reshape(-1), col_stats.reshape(-1), bias)
    return out.astype(dtype or jnp.float16)


def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=jnp.float16) -> jax.Array:
    """int8 A [M, K], int8 B [N, K] -> dequantized A @ B.T in dtype."""
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype=dtype, bias=bias)


def int8_mixed_scaled_mm(
    A: jax.Array,
    CA: jax.Array,
    CB: jax.Array,
    SCA: jax.Array,
    SCB: jax.Array,
    outlier_cols: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """LLM.int8() with decomposition: (output [M, N] in A.dtype, subA = A[:, outlier_cols]).

    A [M, K] original activations; CA/SCA from int8_vectorwise_quant(A); CB [N, K] int8 weight
    with per-row SCB [N]; outlier_cols from int8_vectorwise_quant (entries -1 are padding).
    """
    A2 = _rows(A)
    y = dequantize_accumulator(int8_dot(CA, CB, "nk"), SCA, SCB, bias)
    if outlier_cols is None or outlier_cols.shape[0] == 0:
        return y.astype(A.dtype), jnp.zeros((A2.shape[0], 0), A.dtype)
    valid = outlier_cols >= 0
    safe = jnp.where(valid, outlier_cols, 0)
    col_mask = jnp.zeros(A2.shape[1], bool).at[safe].max(valid)
    capacity = outlier_cols.shape[0]
    contribution, _ = outlier_stream(A2, CB, SCB, col_mask, capacity, "nk")
    sub_a = jnp.where(valid[None, :], jnp.take(A2, safe, axis=1), 0).astype(A.dtype)
    return (y + contribution).astype(A.dtype), sub_a


def quantize_4bit(
    A: jax.Array, *, blocksize: Optional[int] = None, compress_statistics: bool = False, quant_type: str = "fp4"
) -> tuple[jax.Array, quant4.Int4Weight]:
    """A (any shape) -> (packed uint8 [(numel + 1) // 2, 1], quant_state), bitsandbytes' defaults.

    compress_statistics is double quantization (absmax to 8 bits in blocks of 256).
    """
    state = quant4.quantize_4bit(
        A, quant_type=quant_type, blocksize=64 if blocksize is None else blocksize, double_quant=compress_statistics
    )
    return state.packed, state


def dequantize_4bit(
    A: jax.Array,
    quant_state: Optional[quant4.Int4Weight] = None,
    absmax: Optional[jax.Array] = None,
    *,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
    shape: Optional[tuple[int, ...]] = None,
    dtype=jnp.float32,
) -> jax.Array:
    """packed uint8 A -> floats of quant_state.shape in quant_state.dtype.

    Without a quant state: float32 absmax per block, with shape, dtype, blocksize and quant_type.
    """
    if quant_state is None:
        if absmax is None or shape is None:
            raise InvalidConfigError("dequantize_4bit needs quant_state, or absmax and shape")
        quant_state = quant4.Int4Weight(
            packed=A,
            absmax=jnp.asarray(absmax, jnp.float32),
            shape=tuple(shape),
            quant_type=quant_type,
            blocksize=64 if blocksize is None else blocksize,
            dtype=jnp.dtype(dtype),
        )
    else:
        quant_state = quant_state.replace(packed=A)
    quant4.validate_int4_weight(quant_state, "dequantize_4bit")
    return quant4.dequantize_4bit(quant_state)


def matmul_4bit(A: jax.Array, B: jax.Array, quant_state: quant4.Int4Weight, bias: Optional[jax.Array] = None):
    """A [..., K] @ dequantize(B, quant_state).T + bias -> [..., N] in A.dtype (bitsandbytes.matmul_4bit
    for inference): quant_state.shape is the weight's [N, K], B its packed codes."""
    from jint8.ops.int4_matmul import int4_matmul

    state = quant_state.replace(packed=B)
    quant4.validate_int4_weight(state, "matmul_4bit")
    return int4_matmul(A, state, bias, dtype=A.dtype)


__all__ = [
    "dequantize_4bit",
    "int8_linear_matmul",
    "int8_mixed_scaled_mm",
    "int8_mm_dequant",
    "int8_scaled_mm",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "matmul_4bit",
    "quantize_4bit",
]
