"""What the Pallas (Triton lowering) kernels of int8_matmul share: the exact roundings of the
activation quantization (127 / s, round half to even), masked tile loads, the two dots (int8 MMA,
float32 outlier stream), an output tile's rows/cols and bound masks (Tile), the dequantizing
epilogue, and `launch`, the pallas_call of a GEMM kernel whose last argument is an Output.

fused.py, gemm.py and quantize.py import from here; nothing here imports them.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.int8_matmul.configs import KernelTiles
from jint8.numerics import INV_127_SQ


def inverse_scale(row_scale, *, interpret: bool):
    """127 / s rounded exactly as XLA rounds reference.quantize_rows' `127.0 / s` there.

    XLA:CPU's simplifier rewrites it as 127 * (1 / s) (two roundings), so interpret mode does
    the same; on the GPU, Triton's f32 division (div.full.f32) gave XLA:GPU's values bit for bit
    in every gpu_check case, while an IEEE div.rn.f32 did not.
    """
    if interpret:
        return 127.0 * (1.0 / row_scale)
    return 127.0 / row_scale


def round_half_even(a: jax.Array, *, interpret: bool) -> jax.Array:
    """f32 -> f32 rounded to the nearest integer, ties to even (jnp.round)."""
    if interpret:
        return jnp.round(a)
    (out,) = plgpu.elementwise_inline_asm(
        "cvt.rni.f32.f32 $0, $1;",
        args=[a.astype(jnp.float32)],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def load_tile(ref, rows, cols, row_ok, col_ok, other=0):
    """ref[rows, cols] for 1-D index vectors, masked only where a bound can be crossed."""
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


def load_vector(ref, index, ok):
    if ok is None:
        return plgpu.load(ref.at[index])
    return plgpu.load(ref.at[index], mask=ok, other=0)


def load_weight(w_ref, ks, tile, ks_ok, nk_layout):
    """The [ks, cols] weight tile, as [bk, bn] ("kn") or [bn, bk] ("nk")."""
    if nk_layout:
        return load_tile(w_ref, tile.cols, ks, tile.col_ok, ks_ok)
    return load_tile(w_ref, ks, tile.cols, ks_ok, tile.col_ok)


def dot(a, b, *, b_transposed: bool, out_dtype):
    """a [m, k] @ b [k, n], or a @ b.T when b is given as [n, k]."""
    dims = (((1,), (1,)), ((), ())) if b_transposed else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def stream_dot(x_part, w_deq, nk_layout):
    # float32 activations: full-precision FMA dot (jax 0.11's Triton lowering would use TF32).
    # An explicit transpose of the small [bn, C] tile: XLA:CPU (interpret mode) rounded a
    # bf16 dot contracting both minor dims to bf16 before the float32 output (seen in tests).
    precision = jax.lax.Precision.HIGHEST if x_part.dtype == jnp.float32 else None
    if nk_layout:
        w_deq = w_deq.T
    return jax.lax.dot_general(x_part, w_deq, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


class Tile:
    """Output rows/cols of one program and their bound masks (None where no bound is crossed)."""

    def __init__(self, *, rows, cols, m, n):
        self.rows, self.cols, self.m, self.n = rows, cols, m, n
        self.row_ok = rows < m if m % rows.shape[0] else None
        self.col_ok = cols < n if n % cols.shape[0] else None

    def shifted(self, offset: int) -> "Tile":
        """The same tile `offset` columns further (the up half of a gate|up weight, offset = the
        gate's width): its bound masks stay the unshifted tile's."""
        moved = copy.copy(self)
        moved.cols = self.cols + offset
        return moved

    def store_mask(self):
        if self.row_ok is None and self.col_ok is None:
            return None
        return (self.rows < self.m)[:, None] & (self.cols < self.n)[None, :]


def dequantize(acc, row_scales, col_scales, bias_ref, stream, tile, split, *, split_k: int):
    """[block_m, block_n] float32 y = acc * (s_row s_col) / 127^2, + bias (read from bias_ref
    unless None; added by split 0 only), + stream (the scaled outlier stream, unless None)."""
    y = acc.astype(jnp.float32) * (row_scales[:, None] * col_scales[None, :]) * INV_127_SQ
    if bias_ref is not None:
        bias = load_vector(bias_ref, tile.cols, tile.col_ok).astype(jnp.float32)
        if split_k > 1:
            bias = jnp.where(split == 0, bias, 0.0)
        y = y + bias[None, :]
    if stream is not None:
        y = y + stream
    return y


class Probe(NamedTuple):
    """What the correctness checks ask of a kernel and the op never does (int8_matmul/testing.py):
    accumulator_only: write the exact int32 accumulator xq[:, not O] @ wq instead of the output;
    poison_output: write into a NaN-filled (int32: INT32_MIN) buffer aliased into the output, so
    any element the kernel did not write shows."""

    accumulator_only: bool = False
    poison_output: bool = False


NO_PROBE = Probe()


def launch(kernel, operands, *, grid, m, n, config: KernelTiles, out_dtype, interpret: bool, name: str,
           probe: Probe = NO_PROBE, split_partials: bool = False):
    """pallas_call of an int8 GEMM kernel whose last argument is an Output; returns [M, N].

    split_k == 1 writes [M, N] out_dtype. split_k > 1 writes float32 partials [S, M, N], summed
    here by an XLA reduction, or with split_partials=True returned unsummed ([S, M, N] float32)
    for the caller to sum where it reads them. probe.accumulator_only (checks): int32 partials
    [S, M, N], summed here. probe.poison_output aliases a NaN-filled (int32: INT32_MIN) buffer
    into the result so unwritten elements show.
    """
    if probe.accumulator_only:
        out_shape = jax.ShapeDtypeStruct((config.split_k, m, n), jnp.int32)
    elif config.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((config.split_k, m, n), jnp.float32)
    extra, aliases = [], {}
    if probe.poison_output:
        poison = jnp.iinfo(jnp.int32).min if out_shape.dtype == jnp.int32 else jnp.nan
        aliases[len(operands)] = 0
        extra.append(jnp.full(out_shape.shape, poison, out_shape.dtype))
    num_inputs = len(operands) + len(extra)

    def body(*refs):
        # The aliased input is the same buffer as its output: only the output is used.
        outputs = Output(refs[num_inputs:], config=config, accumulator_only=probe.accumulator_only)
        return kernel(*refs[:len(operands)], outputs)

    outs = pl.pallas_call(
        body,
        grid=grid,
        out_shape=[out_shape],
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*operands, *extra)
    if probe.accumulator_only:
        return outs[0].sum(axis=0, dtype=jnp.int32)
    if config.split_k == 1 or split_partials:
        return outs[0]
    return outs[0].sum(axis=0).astype(out_dtype)


class Output:
    """Where a program's [block_m, block_n] result goes (see launch)."""

    def __init__(self, refs, *, config: KernelTiles, accumulator_only: bool):
        self.refs, self.config, self.accumulator_only = refs, config, accumulator_only

    def store(self, y, tile: Tile, split):
        """y: the program's float32 result (int32 accumulator with accumulator_only)."""
        mask = tile.store_mask()
        at = (tile.rows[:, None], tile.cols[None, :])
        if self.accumulator_only or self.config.split_k > 1:  # partial `split` of [S, M, N]
            plgpu.store(self.refs[0].at[(split, *at)], y, mask=mask)
            return
        plgpu.store(self.refs[0].at[at], y.astype(self.refs[0].dtype), mask=mask)
