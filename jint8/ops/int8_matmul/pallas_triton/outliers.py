"""The two-kernel routes' outlier operands from two small Pallas (Triton lowering) kernels.

Between the activation pass (per-column outlier flags) and the GEMM, the routes need the list O
of every outlier column of the batch, xq with the columns of O zeroed, and the operands of the
16-bit outlier stream compacted on O:
  x_o  = x[:, O]      [M, G]  the stream's activations
  w_o  = wq[O, :]     [G, N] ("kn") or [N, G] ("nk"), int8
Nothing here has a capacity that a user sets: O holds all |O| <= K columns, and the number of
chunks each program walks is read from the count on the device, so the kernel's cost follows
the batch's |O| with no recompilation and no host round trip. G, the static size of the
compacted buffers (gather_slots(K)), decides only which of two exact ways the GEMM streams the
outlier terms: |O| <= G gathers O's operands here (the GEMM then runs |O| / SLOT_BLOCK slot
steps), |O| > G gathers nothing (`dense` is set) and the GEMM sweeps all of K with x masked to
the flagged columns, reading the weight where it lies: at that density a gather would touch
every sector of the weight anyway. Either way xq's columns of O are zeroed (in place: the
activation pass cannot zero them, no row block of it knows the column mask), so the int8 GEMM
that follows (Triton's K loop or XLA's) sums only the non-outlier columns and needs no int32
correction.

Two launches. The first, one program, reads the [K] flags and forms O with a prefix sum (the
k-th flagged column goes to slot cumsum - 1, in ascending column order as jnp.nonzero gives
it), the count and the dense flag. (Forming O in every program of the second kernel instead
saved the launch but had hundreds of programs store the same slot words: those stores
serialise in L2, 98 us at 64 outlier columns on 8192 x 28672 against 8 at none.) The second
walks O in SLOT_BLOCK chunks for its block: block_rows rows of x gathered and of xq zeroed
(the first programs), or block_cols weight columns gathered (the rest). Slots of the last
chunk past the count are written as zeros, so the GEMM reads whole SLOT_BLOCK steps without
masks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.int8_matmul import reference

BLOCK_ROWS = 32  # rows of x (and xq) per program
# Weight columns (output features) per program: its gathers read single bytes, so many small
# programs keep more loads in flight than a few wide ones.
BLOCK_COLS = 64
# Slots per chunk, here and in the GEMM's outlier loop: a multiple of the 16-bit MMA's K step.
SLOT_BLOCK = 64
# Up to this share of K is gathered; denser batches stream the weight in place (module docstring).
GATHER_FRACTION = 4


def gather_slots(k: int) -> int:
    """G, the compacted buffers' static width for K input features: K / GATHER_FRACTION rounded
    up to SLOT_BLOCK (at least one chunk, at most K rounded up: then nothing is ever dense)."""
    whole = pl.cdiv(k, SLOT_BLOCK) * SLOT_BLOCK
    return min(whole, max(SLOT_BLOCK, pl.cdiv(k // GATHER_FRACTION, SLOT_BLOCK) * SLOT_BLOCK))


class OutlierOperands(NamedTuple):
    """The outlier terms' operands (module docstring)."""

    x_o: jax.Array  # [M, G] x.dtype: x[:, O] when count <= G (zero past the count)
    xq: jax.Array  # [M, K] int8: the input xq with every column of O zeroed
    w_o: jax.Array  # [G, N] ("kn") or [N, G] ("nk") int8: wq's rows O when count <= G
    slots: jax.Array  # [K] int32: O's column indices in the first `count` entries
    count: jax.Array  # [1] int32: |O|, the outlier columns in the batch
    dense: jax.Array  # [1] int32: 1 when count > G (x_o and w_o unwritten: the GEMM sweeps K)


def outlier_operands_reference(x, xq, wq, col_flags, *, gather_slots: int,
                               weight_layout: str) -> OutlierOperands:
    """Plain jnp of the kernel's outputs. Where the kernel leaves buffers unwritten (x_o and w_o
    when dense, slots past the count) this returns zeros; a comparison masks those parts."""
    k = x.shape[1]
    col_mask = col_flags > 0
    count = jnp.sum(col_mask, dtype=jnp.int32)
    dense = count > gather_slots
    slots, valid = reference.outlier_columns(col_mask, k)
    xq = jnp.where(col_mask[None, :], jnp.int8(0), xq)
    pad = max(gather_slots - k, 0)
    slots_g = jnp.pad(slots, (0, pad))[:gather_slots]
    valid_g = jnp.pad(valid, (0, pad))[:gather_slots] & ~dense
    x_o = jnp.where(valid_g[None, :], jnp.take(x, slots_g, axis=1), 0).astype(x.dtype)
    if weight_layout == "nk":
        w_o = jnp.where(valid_g[None, :], jnp.take(wq, slots_g, axis=1), 0)
    else:
        w_o = jnp.where(valid_g[:, None], jnp.take(wq, slots_g, axis=0), 0)
    return OutlierOperands(x_o, xq, w_o.astype(jnp.int8), jnp.where(valid, slots, 0),
                           count.reshape(1), dense.astype(jnp.int32).reshape(1))


def _load(ref, index, mask):
    return plgpu.load(ref.at[index], mask=mask, other=0)


def _slots_kernel(flags_ref, slots_ref, count_ref, dense_ref, *, gathered_max: int):
    """One program: O from the [K] flags by a prefix sum (the k-th flagged column goes to slot
    cumsum - 1), the count and the dense flag. Entry K of slots takes the writes of unflagged
    lanes, so the masked scatter has no colliding live lanes (interpret mode writes masked-off
    lanes back with the value they read)."""
    k = flags_ref.shape[0]
    ks = jnp.arange(1 << (k - 1).bit_length())
    flags = (_load(flags_ref, ks, ks < k) > 0).astype(jnp.int32)
    prefix = jnp.cumsum(flags)
    count = jnp.sum(flags)
    live = flags > 0
    plgpu.store(slots_ref.at[jnp.where(live, prefix - 1, k)], ks, mask=live)
    first = jnp.arange(1)
    plgpu.store(count_ref.at[first], jnp.full((1,), count, jnp.int32))
    plgpu.store(dense_ref.at[first], jnp.full((1,), count > gathered_max, jnp.int32))


def _operands_kernel(slots_ref, count_ref, x_ref, xq_in_ref, w_ref, x_o_ref, xq_ref, w_o_ref, *,
                     nk_layout: bool, row_programs: int, block_rows: int, block_cols: int):
    del xq_in_ref  # aliased to xq_ref: the activation pass's xq on entry
    m, k = x_ref.shape
    n = w_ref.shape[0] if nk_layout else w_ref.shape[1]
    gathered_max = x_o_ref.shape[1]
    count = plgpu.load(count_ref.at[jnp.arange(1)])[0]
    chunks = pl.cdiv(count, SLOT_BLOCK)
    gather_chunks = jnp.where(count <= gathered_max, chunks, 0)
    pid = pl.program_id(0)

    def chunk(j):
        """Chunk j of O: (slot numbers, which are live, their columns: 0 where not live)."""
        slot = j * SLOT_BLOCK + jnp.arange(SLOT_BLOCK)
        valid = slot < count
        return slot, valid, _load(slots_ref, slot, valid)

    @pl.when(pid < row_programs)
    def _rows():
        rows = pid * block_rows + jnp.arange(block_rows)
        row_ok = rows < m

        def zero_xq(j, carry):
            _, valid, cols = chunk(j)
            # Dead slots aim at the chunk's first live column (zeroed anyway), and every lane
            # stores: interpret mode writes masked-off lanes back with the value they read,
            # which must not land on a live column. Chunk j < chunks has a live slot 0.
            first = jnp.min(jnp.where(valid, cols, k))
            target = (rows[:, None], jnp.where(valid, cols, first)[None, :])
            plgpu.store(xq_ref.at[target], jnp.zeros((block_rows, SLOT_BLOCK), jnp.int8),
                        mask=row_ok[:, None])
            return carry

        def gather_x(j, carry):
            slot, valid, cols = chunk(j)
            at = (rows[:, None], cols[None, :])
            plgpu.store(x_o_ref.at[rows[:, None], slot[None, :]],
                        _load(x_ref, at, row_ok[:, None] & valid[None, :]), mask=row_ok[:, None])
            return carry

        jax.lax.fori_loop(0, chunks, zero_xq, 0)
        jax.lax.fori_loop(0, gather_chunks, gather_x, 0)

    @pl.when(pid >= row_programs)
    def _weight_columns():
        outs = (pid - row_programs) * block_cols + jnp.arange(block_cols)
        out_ok = outs < n

        def gather_w(j, carry):
            slot, valid, cols = chunk(j)
            if nk_layout:
                at, to = (outs[:, None], cols[None, :]), (outs[:, None], slot[None, :])
                mask, store_mask = out_ok[:, None] & valid[None, :], out_ok[:, None]
            else:
                at, to = (cols[:, None], outs[None, :]), (slot[:, None], outs[None, :])
                mask, store_mask = valid[:, None] & out_ok[None, :], out_ok[None, :]
            plgpu.store(w_o_ref.at[to], _load(w_ref, at, mask), mask=store_mask)
            return carry

        jax.lax.fori_loop(0, gather_chunks, gather_w, 0)


@functools.partial(jax.jit, static_argnames=("gather_slots", "weight_layout", "interpret",
                                             "block_rows", "block_cols"))
def outlier_operands(x, xq, wq, col_flags, *, gather_slots: int, weight_layout: str,
                     interpret: bool = False, block_rows: int = BLOCK_ROWS,
                     block_cols: int = BLOCK_COLS) -> OutlierOperands:
    """x [M, K], xq [M, K] int8, wq [K, N] ("kn") or [N, K] ("nk") int8, col_flags [K] int32
    (nonzero on outlier columns) -> OutlierOperands with G = gather_slots compacted slots (a
    multiple of SLOT_BLOCK): equal to outlier_operands_reference where the kernel writes.
    xq's buffer is reused for the returned xq (XLA copies it first if the caller still uses
    it)."""
    m, k = x.shape
    nk_layout = weight_layout == "nk"
    n = wq.shape[0] if nk_layout else wq.shape[1]
    wq_k = wq.shape[1] if nk_layout else wq.shape[0]
    if xq.shape != (m, k) or col_flags.shape != (k,) or wq_k != k:
        raise ValueError(f"outlier_operands: x {x.shape}, xq {xq.shape}, wq {wq.shape} "
                         f"({weight_layout}) and col_flags {col_flags.shape} do not agree on K={k}")
    if gather_slots < SLOT_BLOCK or gather_slots % SLOT_BLOCK:
        raise ValueError(f"outlier_operands: gather_slots={gather_slots} must be a positive "
                         f"multiple of SLOT_BLOCK={SLOT_BLOCK}")
    # The prefix sum holds all K flags in one program: more warps for longer K.
    warps = max(4, min(16, (1 << (k - 1).bit_length()) // 1024))
    slots, count, dense = pl.pallas_call(
        functools.partial(_slots_kernel, gathered_max=gather_slots),
        grid=(1,),
        out_shape=(
            jax.ShapeDtypeStruct((k + 1,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="jint8_outlier_slots",
    )(col_flags)
    row_programs = pl.cdiv(m, block_rows)
    kernel = functools.partial(_operands_kernel, nk_layout=nk_layout, row_programs=row_programs,
                               block_rows=block_rows, block_cols=block_cols)
    w_shape = (n, gather_slots) if nk_layout else (gather_slots, n)
    x_o, xq, w_o = pl.pallas_call(
        kernel,
        grid=(row_programs + pl.cdiv(n, block_cols),),
        out_shape=(
            jax.ShapeDtypeStruct((m, gather_slots), x.dtype),
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct(w_shape, jnp.int8),
        ),
        input_output_aliases={3: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jint8_outlier_operands",
    )(slots, count, x, xq, wq)
    return OutlierOperands(x_o, xq, w_o, slots[:k], count, dense)
