"""int8 GEMM of LLM.int8() with its whole epilogue fused, as a Pallas (Triton lowering) kernel.

One program computes out[block_m, block_n]:
  acc   = xq[rows, :] @ wq[:, cols]                       int8 x int8 -> int32, K in block_k steps
                                                          (xq's columns in O arrive zeroed)
  y     = acc * (s_x[rows] * s_w[cols]) * (1/127^2)       bitsandbytes' int8_mm_dequant order
  y    += bias[cols]
  y    += x[rows, O] @ (wq[O, cols] * s_w * (1/127)).astype(x.dtype)      the outlier stream
  out   = y.astype(out_dtype)
O is the list of all the batch's outlier columns, any number from 0 to K, with no capacity: for
|O| <= G (pallas_triton_outliers.gather_slots) x[:, O] and O's int8 weight rows come compacted
from pallas_triton_outliers and the stream runs ceil(|O| / SLOT_BLOCK) steps over them, a loop
bound the kernel reads from the device count; for |O| > G the stream sweeps all of K with x
masked to the flagged columns, reading the weight in place (a flag read in the kernel picks
the way: no lax.cond outside, no host sync, no recompilation when |O| changes). xq arrives
with the columns of O zeroed, so the K loop stays a pure int8 dot that Triton pipelines and no
int32 correction is needed. (Doing the outlier work inside the int8 K loop, in the steps that
hold outlier columns, put a branch in the loop that stopped the pipelining: 1.4x slower at
M = 1..16.)

weight_layout="nk" takes the weight transposed, wt[N, K] (bitsandbytes' layout, K-major):
Triton's int8 MMAs (wgmma) want both operands K-major, and with wq[K, N] they fall back to a
slow path (measured 2-4x slower from M = 64 up; docs/decisions.md D1).
swap_ab computes the transposed tile out.T = w_tile.T @ xq_tile.T (the weight becomes the A
operand, which the MMA may take from registers in any layout); tried for the [K, N] layout.

split_k > 1 (skinny M): program (tile, s) sums K steps [s*steps/S, (s+1)*steps/S); split 0 alone
adds the correction, bias and outlier stream; the wrapper sums the float32 partials
[S, M, N] (each is its int32 partial times the same scale: the float sum differs from scaling
the int32 total by float32 rounding only, well inside the tests' bound).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.int8_matmul.configs import Config
from jint8.ops.int8_matmul.pallas_triton_outliers import SLOT_BLOCK
from jint8.ops.int8_matmul.reference import INV_127, INV_127_SQ

# Rows of output tiles walked together so their weight columns stay in L2 (large M only).
_GROUP_M = 8
# Columns per step of the dense outlier sweep in the epilogue-only kernel (_outlier_terms).
EPILOGUE_SWEEP_STEP = 128


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


def _load_vector(ref, index, ok):
    if ok is None:
        return plgpu.load(ref.at[index])
    return plgpu.load(ref.at[index], mask=ok, other=0)


def _dot(a, b, *, b_transposed: bool, out_dtype):
    """a [m, k] @ b [k, n], or a @ b.T when b is given as [n, k]."""
    dims = (((1,), (1,)), ((), ())) if b_transposed else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _gemm_kernel(
    xq_ref, w_ref, row_scales_ref, col_scales_ref, bias_ref, x_ref,
    x_o_ref, w_o_ref, col_flags_ref, count_ref, dense_ref, *accumulator_and_out,
    config: Config, has_bias: bool, has_outliers: bool, dense_fallback: bool,
    accumulator_only: bool,
):
    m, k = xq_ref.shape
    nk_layout = config.weight_layout == "nk"
    n = w_ref.shape[0] if nk_layout else w_ref.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    pid_m, pid_n = _tile_coordinates(m, n, config)
    split = pl.program_id(1)
    tile = _Tile(rows=pid_m * bm + jnp.arange(bm), cols=pid_n * bn + jnp.arange(bn), m=m, n=n)

    k_steps = pl.cdiv(k, bk)
    steps_per_split = pl.cdiv(k_steps, config.split_k)
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, k_steps)

    def k_step(i, acc):
        ks = i * bk + jnp.arange(bk)
        k_ok = ks < k if k % bk else None
        a = _load(xq_ref, tile.rows, ks, tile.row_ok, k_ok)
        b = _load_weight(w_ref, ks, tile, k_ok, nk_layout)
        if config.swap_ab:  # acc.T += w_tile.T @ xq_tile.T: the weight is the MMA's A operand
            dims = (((1 if nk_layout else 0,), (1,)), ((), ()))
            return acc + jax.lax.dot_general(b, a, dims, preferred_element_type=jnp.int32)
        return acc + _dot(a, b, b_transposed=nk_layout, out_dtype=jnp.int32)

    *accumulator_ref, out = accumulator_and_out
    if accumulator_ref:  # epilogue only: XLA's int8 GEMM computed xq @ wq (int8_gemm docstring)
        acc = _load(accumulator_ref[0], tile.rows, tile.cols, tile.row_ok, tile.col_ok)
    else:
        acc_shape = (bn, bm) if config.swap_ab else (bm, bn)
        acc = jax.lax.fori_loop(first_step, last_step, k_step, jnp.zeros(acc_shape, jnp.int32))
        if config.swap_ab:
            acc = acc.T

    col_scales = _load_vector(col_scales_ref, tile.cols, tile.col_ok)
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

    row_scales = _load_vector(row_scales_ref, tile.rows, tile.row_ok)
    dequantize_store(out, acc, row_scales, col_scales, bias_ref if has_bias else None,
                     stream if has_outliers else None, tile, split, split_k=config.split_k)


def dequantize_store(out, acc, row_scales, col_scales, bias_ref, stream, tile, split, *,
                     split_k: int):
    """The epilogue both GEMM kernels end with: dequantize(...), stored by `out` (Output) for
    this tile and split."""
    out.store(dequantize(acc, row_scales, col_scales, bias_ref, stream, tile, split,
                         split_k=split_k), tile, split)


def dequantize(acc, row_scales, col_scales, bias_ref, stream, tile, split, *, split_k: int):
    """[block_m, block_n] float32 y = acc * (s_row s_col) / 127^2, + bias (read from bias_ref
    unless None; added by split 0 only), + stream (the scaled outlier stream, unless None)."""
    y = acc.astype(jnp.float32) * (row_scales[:, None] * col_scales[None, :]) * INV_127_SQ
    if bias_ref is not None:
        bias = _load_vector(bias_ref, tile.cols, tile.col_ok).astype(jnp.float32)
        if split_k > 1:
            bias = jnp.where(split == 0, bias, 0.0)
        y = y + bias[None, :]
    if stream is not None:
        y = y + stream
    return y


class _Tile:
    """Output rows/cols of one program and their bound masks (None where no bound is crossed)."""

    def __init__(self, *, rows, cols, m, n):
        self.rows, self.cols, self.m, self.n = rows, cols, m, n
        self.row_ok = rows < m if m % rows.shape[0] else None
        self.col_ok = cols < n if n % cols.shape[0] else None

    def shifted(self, offset: int) -> "_Tile":
        """The same tile `offset` columns further (the up half of a gate|up weight, offset = the
        gate's width): its bound masks stay the unshifted tile's."""
        moved = copy.copy(self)
        moved.cols = self.cols + offset
        return moved

    def store_mask(self):
        if self.row_ok is None and self.col_ok is None:
            return None
        return (self.rows < self.m)[:, None] & (self.cols < self.n)[None, :]


def _load_weight(w_ref, ks, tile, ks_ok, nk_layout):
    """The [ks, cols] weight tile, as [bk, bn] ("kn") or [bn, bk] ("nk")."""
    if nk_layout:
        return _load(w_ref, tile.cols, ks, tile.col_ok, ks_ok)
    return _load(w_ref, ks, tile.cols, ks_ok, tile.col_ok)


def _stream_dot(x_part, w_deq, nk_layout):
    # float32 activations: full-precision FMA dot (jax 0.11's Triton lowering would use TF32).
    # An explicit transpose of the small [bn, C] tile: XLA:CPU (interpret mode) rounded a
    # bf16 dot contracting both minor dims to bf16 before the float32 output (seen in tests).
    precision = jax.lax.Precision.HIGHEST if x_part.dtype == jnp.float32 else None
    if nk_layout:
        w_deq = w_deq.T
    return jax.lax.dot_general(x_part, w_deq, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _outlier_terms(x_ref, w_ref, x_o_ref, w_o_ref, col_flags_ref, count_ref, dense_ref, tile,
                   col_scales, *, config, dense_fallback, sweep_step):
    """The float32 outlier stream x[rows, O] @ dequant(wq[O, cols]) of one output tile, for any
    |O| from 0 to K: over the compacted slots in SLOT_BLOCK steps, as many as the batch's count
    needs (a loop bound read on the device), or, when the batch had more outlier columns than
    were gathered (pallas_triton_outliers: `dense`), over all of K with x masked to the flagged
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
            x_o = _load(x_o_ref, rows, slot, row_ok, None)
            w_o = _load_weight(w_o_ref, slot, tile, None, nk_layout)
            return stream + _stream_dot(x_o, w_o.astype(x_ref.dtype), nk_layout)

        return jax.lax.fori_loop(0, pl.cdiv(count, SLOT_BLOCK), slot_step,
                                 jnp.zeros((bm, bn), jnp.float32))

    def dense(_):
        k = x_ref.shape[1]

        def k_step(i, stream):
            ks = i * sweep_step + jnp.arange(sweep_step)
            k_ok = ks < k if k % sweep_step else None
            flagged = plgpu.load(col_flags_ref.at[ks], mask=ks < k, other=0) > 0
            x = jnp.where(flagged[None, :], _load(x_ref, rows, ks, row_ok, k_ok), 0)
            w = _load_weight(w_ref, ks, tile, k_ok, nk_layout)
            return stream + _stream_dot(x, w.astype(x_ref.dtype), nk_layout)

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
                     "accumulator_only", "poison_output", "interpret"),
)
def int8_gemm(
    xq, w, row_scales, col_scales, bias, x, x_o, w_o, col_flags, count, dense,
    accumulator=None, *, config: Config, out_dtype, has_bias: bool, has_outliers: bool,
    dense_fallback: bool, accumulator_only: bool = False, poison_output: bool = False, interpret: bool = False,
):
    """The fused GEMM.

    Args:
      xq: [M, K] int8 from the activation pass, every outlier column zeroed
        (pallas_triton_outliers).
      w: [K, N] int8 (config.weight_layout "kn") or [N, K] ("nk").
      row_scales: [M] f32; col_scales: [N] f32; bias: [N] (read only if has_bias).
      x: [M, K] the original activations (the dense outlier sweep reads them).
      x_o, w_o: the compacted outlier operands (pallas_triton_outliers.OutlierOperands):
        x[:, O] [M, G] and the weight rows [G, N] ("kn") or [N, G] ("nk") int8, zero past the
        count in its last SLOT_BLOCK chunk; G a multiple of SLOT_BLOCK. Read only if
        has_outliers.
      col_flags: [K] int32, nonzero on outlier columns; count: [1] int32, the number of them;
        dense: [1] int32, nonzero when count > G (x_o, w_o unwritten: the dense sweep runs).
      dense_fallback: False when G covers all of K (the dense sweep is not compiled).
      accumulator: optional [M, N] int32 xq @ w computed elsewhere (XLA's int8 GEMM, the
        "xla_gemm" route): the kernel then runs no K loop, only the epilogue on it (scales,
        bias, outlier stream, cast). Needs config.split_k == 1.
      accumulator_only: return the int32 [M, N] accumulator xq[:, not O] @ wq instead (checks).
      poison_output: start from a NaN-filled (int32: INT32_MIN) output buffer, aliased into the
        kernel's output, so the GPU check sees any element the kernel did not write.
    Returns:
      [M, N] out_dtype (int32 with accumulator_only).
    """
    m, k = xq.shape
    n = w.shape[0] if config.weight_layout == "nk" else w.shape[1]
    tiles = pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)
    kernel = functools.partial(
        _gemm_kernel, config=config, has_bias=has_bias, has_outliers=has_outliers,
        dense_fallback=dense_fallback, accumulator_only=accumulator_only,
    )
    operands = [xq, w, row_scales, col_scales, bias, x, x_o, w_o, col_flags, count, dense]
    if accumulator is not None:
        if config.split_k != 1 or accumulator.shape != (m, n) or accumulator.dtype != jnp.int32:
            raise ValueError(
                f"int8_gemm: accumulator must be int32 {(m, n)} with split_k=1, got "
                f"{accumulator.dtype} {accumulator.shape}, split_k={config.split_k}")
        operands.append(accumulator)
    return launch(kernel, operands, grid=(tiles, config.split_k), m=m, n=n, config=config,
                  out_dtype=out_dtype, accumulator_only=accumulator_only,
                  poison_output=poison_output, interpret=interpret, name="jint8_int8_gemm")


def launch(kernel, operands, *, grid, m, n, config: Config, out_dtype, accumulator_only: bool,
           poison_output: bool, interpret: bool, name: str, sum_splits: bool = True):
    """pallas_call of an int8 GEMM kernel whose last argument is an Output; returns [M, N].

    split_k == 1 writes [M, N] out_dtype. split_k > 1 writes float32 partials [S, M, N], summed
    here (split_reduce "xla" or "consumer"; with sum_splits=False they are returned unsummed,
    [S, M, N] float32, for the caller to sum) or by the tile's last program (split_reduce "kernel": also
    [S, M, N] partials and [tiles] int32 tickets, a zero-filled input aliased into an output).
    accumulator_only (checks): int32 partials [S, M, N], summed here. poison_output aliases a
    NaN-filled (int32: INT32_MIN) buffer into the result so unwritten elements show.
    """
    in_kernel = config.split_k > 1 and config.split_reduce == "kernel" and not accumulator_only
    if accumulator_only:
        out_shapes = [jax.ShapeDtypeStruct((config.split_k, m, n), jnp.int32)]
    elif config.split_k == 1:
        out_shapes = [jax.ShapeDtypeStruct((m, n), out_dtype)]
    elif in_kernel:
        out_shapes = [jax.ShapeDtypeStruct((m, n), out_dtype),
                      jax.ShapeDtypeStruct((config.split_k, m, n), jnp.float32),
                      jax.ShapeDtypeStruct((grid[0],), jnp.int32)]
    else:
        out_shapes = [jax.ShapeDtypeStruct((config.split_k, m, n), jnp.float32)]
    extra, aliases = [], {}
    if poison_output:
        poison = jnp.iinfo(jnp.int32).min if out_shapes[0].dtype == jnp.int32 else jnp.nan
        aliases[len(operands) + len(extra)] = 0
        extra.append(jnp.full(out_shapes[0].shape, poison, out_shapes[0].dtype))
    if in_kernel:
        aliases[len(operands) + len(extra)] = 2
        extra.append(jnp.zeros((grid[0],), jnp.int32))
    num_inputs = len(operands) + len(extra)

    def body(*refs):
        # The aliased inputs are the same buffers as their outputs: only the outputs are used.
        outputs = Output(refs[num_inputs:], config=config, accumulator_only=accumulator_only,
                         interpret=interpret)
        return kernel(*refs[:len(operands)], outputs)

    outs = pl.pallas_call(
        body,
        grid=grid,
        out_shape=out_shapes,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*operands, *extra)
    if accumulator_only:
        return outs[0].sum(axis=0, dtype=jnp.int32)
    if config.split_k == 1 or in_kernel:
        return outs[0]
    if not sum_splits:
        return outs[0]
    return outs[0].sum(axis=0).astype(out_dtype)


class Output:
    """Where a program's [block_m, block_n] result goes (see launch)."""

    def __init__(self, refs, *, config: Config, accumulator_only: bool, interpret: bool):
        self.refs, self.config = refs, config
        self.accumulator_only, self.interpret = accumulator_only, interpret

    def store(self, y, tile: "_Tile", split):
        """y: the program's float32 result (int32 accumulator with accumulator_only)."""
        config, mask = self.config, tile.store_mask()
        at = (tile.rows[:, None], tile.cols[None, :])
        if self.accumulator_only or (config.split_k > 1 and config.split_reduce != "kernel"):
            plgpu.store(self.refs[0].at[(split, *at)], y, mask=mask)
            return
        if config.split_k == 1:
            plgpu.store(self.refs[0].at[at], y.astype(self.refs[0].dtype), mask=mask)
            return
        out, partials, tickets = self.refs
        plgpu.store(partials.at[(split, *at)], y, mask=mask)
        if not self.interpret:
            # Every thread's partial is issued before the (acquire-release, GPU-scope) ticket.
            plgpu.debug_barrier()
        ticket = plgpu.atomic_add(tickets, pl.program_id(0), jnp.ones((), jnp.int32))

        @pl.when(ticket == config.split_k - 1)
        def _last_of_tile():  # the tile's other S - 1 partials are visible: sum in split order
            masked = {} if mask is None else dict(mask=mask, other=0.0)
            total = plgpu.load(partials.at[(0, *at)], **masked)
            for s in range(1, config.split_k):
                total = total + plgpu.load(partials.at[(s, *at)], **masked)
            plgpu.store(out.at[at], total.astype(out.dtype), mask=mask)
