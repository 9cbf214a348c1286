"""The whole LLM.int8() matmul in one Pallas (Triton lowering) kernel, for skinny M (decode).

One program owns all M rows (M <= block_m <= 64) and block_n output features; the grid is
(N / block_n, split_k). Each program:
  1. s_x[m] = max_k |x[m, k]| over the elements below the threshold      one sweep over x (the
                                                                          few rows sit in L2), or
                                                                          an input (row_scales)
  2. K loop, block_k per step, on the x tile it loads anyway:
       flags[k] = any_m |x[m, k]| >= t                                   the outlier columns O
       xq       = round(x * 127 / s_x), 0 in flagged columns             bit-equal to reference
       acc     += xq @ w_tile                                            int8 -> int32, exact
       stream  += (x * flags) @ w_tile.astype(x.dtype)                   float32 (outlier_mode)
  3. y = acc * (s_x * s_w) / 127^2 + bias + stream * (s_w / 127), cast once to out_dtype.
With an InputNorm (int8_matmul(norm=...): the RMSNorm in front of a Llama projection) a first
sweep sums each row's squares for 1/rms, and every x above (the absmax sweep's chunks and the K
loop's tiles) is the loaded tile normalised with reference.rms_norm's operations and roundings,
so the norm needs no kernel of its own. With an InputGate (int8_matmul(gate=...): Llama's
down_proj reading the [M, 2K] gate_up output) every x above is act(gate) * up, formed from the
gate tile and the up tile K columns further with reference.gated_activation's roundings, so the
multiply needs no kernel of its own either (_Prologue).
With an OutputGate (int8_matmul(output_gate=...): Llama's fused gate|up projection) program j
owns output columns j of act(gate) * up: it streams gate's weight tile j and up's tile j (two
MMAs per K step on one quantized x tile) and gates the two results in its epilogue, so the
[M, 2I] product is never written and the multiply needs no kernel of its own.
No capacity, no index list, no lax.cond outside the kernel: every outlier column is found where
its x tile is loaded, so the result is exact to the recipe for any number of outlier columns.

At M = 1 (decode) step 2's activation work runs on the one row of x; the MMA operands (block_m
>= 16 rows) get zero rows below it.

The outlier stream differs from reference.outlier_stream in one rounding: the reference forms
w_deq = (wq * s_w / 127).astype(x.dtype) and sums x * w_deq in float32; here wq.astype(x.dtype)
is exact (|wq| <= 127), so x * wq is formed exactly and summed in float32, and the sum is scaled
by s_w / 127 in float32 at the end. The reference's per-weight rounding to x.dtype (up to half an
ulp of x.dtype, relative) is thus absent here: checks.output_error_bound takes it as one more
term, `weight_rounding`, of half an ulp of x.dtype times sum |x_o * w_deq|.

outlier_mode "branch": the stream's dot sits under a lax.cond per K step (taken only in steps
holding a flagged column); the loads stay outside it so Triton can still pipeline them.
"dense": branch-free; every step converts the weight tile to x.dtype and runs the masked dot.

split_k > 1 (too few output tiles): program (tile, s) sums its K slice; every program computes
the full-K row scales (step 1) itself. The float32 partials [S, M, N] are summed by XLA after
the kernel, or handed to a caller that sums them where it reads them (split_partials).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jint8.ops.int8_matmul.configs import FusedConfig
from jint8.ops.int8_matmul.pallas_triton.common import (
    NO_PROBE, Probe, Tile, dequantize, dot, inverse_scale, launch, load_tile, load_vector, load_weight,
    round_half_even, stream_dot,
)
from jint8.ops.int8_matmul import reference
from jint8.numerics import INV_127
from jint8.ops.rounding import round_to

# The row-absmax sweep loads [rows, 8192 / rows] chunks (16 KiB of bf16), _ABSMAX_UNROLL of them
# per loop iteration: they are independent loads, so their L2 latencies overlap (measured at
# M = 16, one chunk per iteration: 0.142 ms against 0.115 for the two-kernel route).
_ABSMAX_CHUNK_ELEMENTS = 8192
_ABSMAX_UNROLL = 4


def _sweep_rows(load, m: int, k: int, value, reduce: str):
    """[rows_p] float32: the max or sum (reduce) of value(tile) over K, per row, where
    load(rows, cols, row_ok, col_ok) gives the [rows, cols] tile of an [M, K] input.

    The sweep runs on M rounded up to a power of two (rows_p: 1 for decode), not on block_m
    (>= 16 for the MMA), so an M = 1 call loads one row instead of 16 masked ones (_spread
    widens the result). Loads past K or M read 0; value must map 0 to 0.
    """
    rows_p = 1 << (m - 1).bit_length()
    chunk = min(max(_ABSMAX_CHUNK_ELEMENTS // rows_p, 128), 1 << (k - 1).bit_length())
    unroll = min(_ABSMAX_UNROLL, pl.cdiv(k, chunk))
    rows = jnp.arange(rows_p)
    row_ok = rows < m if m != rows_p else None

    chunk_reduce, combine = (jnp.max, jnp.maximum) if reduce == "max" else (jnp.sum, jnp.add)

    def sweep(i, total):
        for j in range(unroll):
            cols = (i * unroll + j) * chunk + jnp.arange(chunk)
            tile = load(rows, cols, row_ok, cols < k if k % (chunk * unroll) else None)
            total = combine(total, chunk_reduce(value(tile), axis=1))
        return total

    return jax.lax.fori_loop(0, pl.cdiv(k, chunk * unroll), sweep, jnp.zeros((rows_p,), jnp.float32))


def _spread(per_row, block_m: int):
    """[rows_p] -> [block_m] (0 past rows_p), as a [block_m, rows_p] select."""
    rows_p = per_row.shape[0]
    if rows_p == block_m:
        return per_row
    spread = jnp.arange(block_m)[:, None] == jnp.arange(rows_p)[None, :]
    return jnp.max(jnp.where(spread, per_row[None, :], 0.0), axis=1)


class _Prologue:
    """How the kernel reads the op's [M, K] input from x_ref: as stored; through the call's
    InputNorm (x_ref [M, K]: 1/rms per row from a first sweep, then reference.rms_norm's ops per
    tile); or through its InputGate (x_ref [M, 2K] = gate | up: each tile is
    reference.gated_activation of the gate tile (columns cols) and the up tile (cols + K))."""

    def __init__(self, x_ref, scale_ref, *, norm, gate, interpret: bool):
        self.x_ref, self.scale_ref, self.norm, self.gate = x_ref, scale_ref, norm, gate
        self.round = functools.partial(round_to, explicit=interpret)
        self.m, width = x_ref.shape
        self.k = width // 2 if gate is not None else width
        self.inverse_rms = None  # [rows_p], the rows of _sweep_rows
        if norm is not None:  # one sweep for the sum of squares, as jnp.mean: sum / K
            squares = _sweep_rows(functools.partial(load_tile, x_ref), self.m, self.k,
                                  lambda x: jnp.square(x.astype(jnp.float32)), "sum")
            self.inverse_rms = jax.lax.rsqrt(squares / self.k + norm.eps)

    def load(self, rows, cols, row_ok, col_ok, inverse_rms=None):
        """The input's [rows, cols] tile in x.dtype (rows from 0); inverse_rms: 1/rms of these
        rows (norm)."""
        if self.gate is not None:
            return self._gated(rows, cols, row_ok, col_ok)
        x = load_tile(self.x_ref, rows, cols, row_ok, col_ok)
        if self.norm is None:
            return x
        xf = x.astype(jnp.float32) * inverse_rms[:, None]
        scale = load_vector(self.scale_ref, cols, cols < self.k if self.k % cols.shape[0] else None)
        scale = scale.astype(jnp.float32)[None, :]
        if self.norm.unit_offset:
            return self.round(xf * (1.0 + scale), x.dtype)
        # scale.astype(dtype) * xf.astype(dtype): the product of two 16-bit floats is exact in
        # float32, so one more rounding gives the 16-bit product.
        return self.round(scale * self.round(xf, x.dtype).astype(jnp.float32), x.dtype)

    def _gated(self, rows, cols, row_ok, col_ok):
        gate = load_tile(self.x_ref, rows, cols, row_ok, col_ok)
        up = load_tile(self.x_ref, rows, cols + self.k, row_ok, col_ok)
        return reference.gated_activation(gate, up, self.gate.activation, gate.dtype, self.round)


def _row_absmax(prologue: _Prologue, *, threshold: float):
    """[rows_p] float32 (_sweep_rows' rows): per row max |x| over elements below the threshold
    (0 past row M)."""

    def load(rows, cols, row_ok, col_ok):
        return prologue.load(rows, cols, row_ok, col_ok, prologue.inverse_rms)

    def magnitude(x):
        value = jnp.abs(x.astype(jnp.float32))
        return jnp.where(value >= threshold, 0.0, value) if threshold > 0 else value

    return _sweep_rows(load, prologue.m, prologue.k, magnitude, "max")


def _tile_columns(config: FusedConfig, output_gate) -> int:
    """Output columns per program: block_n, or with an OutputGate block_n / 2 of act(gate) * up
    from block_n / 2 of gate's and of up's weight columns, so a program streams the plan's
    block_n weight columns per K step (the same shared-memory pipeline as the plain product)."""
    return config.block_n if output_gate is None else max(config.block_n // 2, 16)


def _zero_rows_below(row, block_m: int):
    """[1, C] -> [block_m, C]: the row, then zero rows (the MMA's operand needs >= 16 rows)."""
    return jnp.where(jnp.arange(block_m)[:, None] == 0, row, jnp.zeros_like(row))


def _fused_kernel(x_ref, w_ref, col_scales_ref, bias_ref, *optional_and_out, norm, gate,
                  output_gate, config: FusedConfig, threshold: float, has_bias: bool, row_max_input: bool,
                  accumulator_only: bool, interpret: bool):
    *optional, out = optional_and_out  # [norm scale], [row absmax (row_max_input)]
    row_max_ref = optional.pop() if row_max_input else None
    prologue = _Prologue(x_ref, optional[0] if norm is not None else None, norm=norm,
                         gate=gate, interpret=interpret)
    m, k = prologue.m, prologue.k
    nk_layout = config.weight_layout == "nk"
    n = w_ref.shape[0] if nk_layout else w_ref.shape[1]
    bm, bn, bk = config.block_m, _tile_columns(config, output_gate), config.block_k
    split = pl.program_id(1)
    if output_gate is None:
        tile = Tile(rows=jnp.arange(bm), cols=pl.program_id(0) * bn + jnp.arange(bn), m=m, n=n)
        weight_tiles = (tile,)
    else:  # the program's output columns of act(gate) * up, from those of gate and of up
        tile = Tile(rows=jnp.arange(bm), cols=pl.program_id(0) * bn + jnp.arange(bn), m=m,
                     n=n // 2)
        weight_tiles = (tile, tile.shifted(n // 2))
    has_outliers = threshold > 0

    # Decode (M = 1): the K loop's activation work (load, quantize, flags) runs on the one row
    # and the int8 / 16-bit MMA operands get zero rows below it, instead of running on block_m
    # rows of which block_m - 1 are masked.
    one_row = m == 1
    x_rows = jnp.arange(1) if one_row else tile.rows
    x_rows_ok = None if one_row else tile.row_ok
    widen = functools.partial(_zero_rows_below, block_m=bm) if one_row else (lambda v: v)
    spread = (lambda v: v) if one_row else functools.partial(_spread, block_m=bm)

    if row_max_ref is not None:  # FusedConfig.row_scales == "input": reduced before the kernel
        rows = jnp.arange(1 << (m - 1).bit_length())  # _sweep_rows' rows_p, 0 past row M
        row_max = load_vector(row_max_ref, rows, rows < m if m != rows.shape[0] else None)
    else:
        row_max = _row_absmax(prologue, threshold=threshold)  # per x row
    inverse_rms = None if norm is None else spread(prologue.inverse_rms)
    # reference.quantize_rows: 127 / s rounded as XLA rounds it, 0 for an all-zero row.
    safe = jnp.where(row_max > 0, row_max, 1.0)
    inverse = spread(jnp.where(row_max > 0, inverse_scale(safe, interpret=interpret), 0.0))

    k_steps = pl.cdiv(k, bk)
    steps_per_split = pl.cdiv(k_steps, config.split_k)
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, k_steps)

    def k_step(i, carry):
        accs, streams = carry  # one of each per weight tile
        ks = i * bk + jnp.arange(bk)
        k_ok = ks < k if k % bk else None
        x = prologue.load(x_rows, ks, x_rows_ok, k_ok, inverse_rms)
        ws = [load_weight(w_ref, ks, t, k_ok, nk_layout) for t in weight_tiles]
        xf = x.astype(jnp.float32)
        q = round_half_even(xf * inverse[:, None], interpret=interpret)
        if has_outliers:
            # Outlier elements lie in flagged columns, so zeroing the columns covers them too.
            hit = (jnp.abs(xf) >= threshold).astype(jnp.int32)
            flagged = jnp.max(hit, axis=0) > 0
            q = jnp.where(flagged[None, :], 0.0, q)
        xq = widen(q.astype(jnp.int8))
        accs = tuple(acc + dot(xq, w, b_transposed=nk_layout, out_dtype=jnp.int32)
                     for acc, w in zip(accs, ws))
        if not has_outliers or accumulator_only:
            return accs, streams

        def add_stream():
            x_outlier = widen(jnp.where(flagged[None, :], x, jnp.zeros_like(x)))
            return tuple(stream + stream_dot(x_outlier, w.astype(x.dtype), nk_layout)
                         for stream, w in zip(streams, ws))

        if config.outlier_mode == "dense":
            return accs, add_stream()
        any_flagged = jnp.max(flagged.astype(jnp.int32)) > 0
        return accs, jax.lax.cond(any_flagged, add_stream, lambda: streams)

    init = (tuple(jnp.zeros((bm, bn), jnp.int32) for _ in weight_tiles),
            tuple(jnp.zeros((bm, bn), jnp.float32) for _ in weight_tiles))
    accs, streams = jax.lax.fori_loop(first_step, last_step, k_step, init)

    if accumulator_only:  # checks only: this program's exact int32 xq[:, not O] @ wq
        out.store(accs[0], tile, split)
        return
    ys = []
    for weight_tile, acc, stream in zip(weight_tiles, accs, streams):
        col_scales = load_vector(col_scales_ref, weight_tile.cols, weight_tile.col_ok)
        stream = stream * (col_scales * INV_127)[None, :] if has_outliers else None
        ys.append(dequantize(acc, _spread(row_max, bm), col_scales,
                             bias_ref if has_bias else None, stream, weight_tile, split,
                             split_k=config.split_k))
    if output_gate is None:
        out.store(ys[0], tile, split)
        return
    # reference.int8_matmul_reference(output_gate=): gate and up rounded to the output dtype,
    # then reference.gated_activation's roundings.
    dtype = out.refs[0].dtype
    gate_y, up_y = (prologue.round(y, dtype) for y in ys)
    out.store(reference.gated_activation(gate_y, up_y, output_gate.activation, dtype,
                                         prologue.round), tile, split)


@functools.partial(
    jax.jit,
    static_argnames=("config", "threshold", "out_dtype", "has_bias", "probe", "interpret",
                     "split_partials"),
)
def fused_int8_matmul(
    x, w, col_scales, bias, norm=None, gate=None, output_gate=None, *, config: FusedConfig,
    threshold: float, out_dtype,
    has_bias: bool, probe: Probe = NO_PROBE, interpret: bool = False,
    split_partials: bool = False,
):
    """The one-launch LLM.int8() matmul (module docstring).

    Args:
      x: [M, K] float activations ([M, 2K] with a gate), M <= config.block_m.
      w: [K, N] int8 (config.weight_layout "kn") or [N, K] ("nk").
      col_scales: [N] f32; bias: [N] (read only if has_bias).
      norm: optional reference.InputNorm: x is normalised in the kernel (a sum-of-squares sweep
        before the absmax sweep; each loaded x tile normalised as reference.rms_norm does).
      gate: optional reference.InputGate: x is [M, 2K] = gate | up, and every loaded tile of the
        op's input (absmax sweep and K loop) is act(gate) * up as reference.gated_activation
        computes it. Not with norm.
      output_gate: optional reference.OutputGate: w is gate | up (N = 2I) and the result is
        act(gate) * up [M, I], formed in the epilogue: program j loads the weight tiles of
        gate's columns j and up's columns j, block_n / 2 each (two MMAs per K step on the one
        quantized x tile), and gates its two float32 results, each rounded to out_dtype first
        (reference.int8_matmul_reference's roundings). Needs split_k == 1.
      probe: the checks' instruments (common.Probe; testing.py): the int32 accumulator
        xq[:, not O] @ wq instead of the output, a poisoned output buffer.
      split_partials: return the float32 split-K partials unsummed (the caller sums them where
        it reads them; the plan's FusedConfig.split_partials says whether a caller may ask).
    Returns:
      [M, N] out_dtype ([M, N / 2] with output_gate; int32 with probe.accumulator_only;
      [S, M, N] float32 partials with split_partials and split_k > 1).
    """
    m = x.shape[0]
    n = w.shape[0] if config.weight_layout == "nk" else w.shape[1]
    if norm is not None and gate is not None:
        raise ValueError("fused kernel: norm and gate cannot both be given")
    if output_gate is not None and (config.split_k != 1 or probe.accumulator_only or n % 2):
        raise ValueError(f"fused kernel: output_gate needs split_k == 1 (got {config.split_k}), "
                         f"an even N (got {n}) and no accumulator_only")
    if m > config.block_m:
        raise ValueError(f"fused kernel: M={m} must be <= block_m={config.block_m}")
    # FusedConfig.row_scales "input": the row absmax from one XLA reduction (the same bits: a max is
    # exact in any order); with a norm or gate the kernel sweeps (it forms that input itself).
    row_max_input = config.row_scales == "input" and norm is None and gate is None
    kernel = functools.partial(
        _fused_kernel, norm=None if norm is None else dataclasses.replace(norm, scale=None),
        gate=gate, output_gate=output_gate, config=config, threshold=threshold, has_bias=has_bias,
        row_max_input=row_max_input, accumulator_only=probe.accumulator_only, interpret=interpret,
    )
    operands = [x, w, col_scales, bias] + ([] if norm is None else [norm.scale])
    if row_max_input:
        operands.append(reference.row_absmax(x, threshold))
    n_out = n if output_gate is None else n // 2
    return launch(kernel, operands, grid=(pl.cdiv(n_out, _tile_columns(config, output_gate)),
                                          config.split_k),
                  m=m, n=n_out, config=config, out_dtype=out_dtype, probe=probe,
                  interpret=interpret, split_partials=split_partials,
                  # K x N in the name: a profile times each projection of a model apart
                  name=f"jint8_fused_int8_matmul_{w.size // n}x{n}")


def fused_int8_matmul_reference(x, w, col_scales, bias, *, threshold: float, out_dtype,
                                weight_layout: str = "nk"):
    """Plain jnp of exactly what the fused kernel computes (its outlier-stream rounding too).

    Equal to reference.int8_matmul_reference except that the outlier stream is
    sum(x_o * wq) * s_w / 127 in float32 instead of sum(x_o * w_deq.astype(x.dtype)).
    """
    xq, row_scales, col_mask = reference.quantize_rows(x, threshold)
    y = reference.dequantize_accumulator(reference.int8_dot(xq, w, weight_layout), row_scales,
                                         col_scales, bias)
    if threshold > 0:
        x_o = jnp.where(col_mask[None, :], x, 0).astype(jnp.float32)
        rows = reference.weight_rows(w, None, weight_layout).astype(jnp.float32)
        stream = jnp.dot(x_o, rows, precision=jax.lax.Precision.HIGHEST)
        y = y + stream * (col_scales * INV_127)[None, :]
    return y.astype(out_dtype)
