"""The two-kernel routes' outlier operands in one small Pallas (Triton lowering) kernel.

Between the activation pass (per-column outlier flags) and the GEMM, the routes need the
static-size list O of outlier columns and the operands of the outlier stream on it:
  x_o  = x[:, O]      [M, C]  the 16-bit outlier stream's activations
  w_o  = wq[O, :]     [C, N] ("kn") or [N, C] ("nk"), int8
with 0 in the slots past the outlier count (or past the capacity), the count and the
capacity-overflow flag, and xq with the columns of O zeroed (in place: the activation pass
cannot zero them, no row block of it knows the column mask), so the int8 GEMM that follows
(Triton's K loop or XLA's) sums only the non-outlier columns and needs no correction. On a
capacity overflow the flagged columns past O stay in xq: the GEMM's dense sweep subtracts their
exact int32 share.

Before, XLA formed O (jnp.nonzero: a broadcast, a cumulative sum, a scatter and a select, each a
kernel), and every epilogue program gathered its own x_o, xq_o and w_o tiles from the scattered
columns and subtracted xq_o @ w_o: at M = 256 on 8192x28672 that was 8 small XLA kernels
(~21 us) and 39 of the epilogue's 54 us (profile_op.py, 2026-11-24), since each x_o tile was
gathered again by all N / block_n programs of its rows. (Gathering w_o in the epilogue again,
from this kernel's slot list, was 4 us faster at M = 256 and 84 us slower at M = 4096, where 64
row tiles share each weight tile.)

Here each program reads the [K] flags once, forms O with a prefix sum (the k-th flagged column
goes to slot cumsum - 1, in ascending column order as jnp.nonzero gives it), writes it to a
[C + 1] scratch output (slot C takes the writes of unflagged lanes, so a masked scatter has no
colliding live lanes in interpret mode either), waits on a block barrier, reads it back as a
[C] vector and does one block: block_rows rows of x gathered and of xq zeroed on O (the first
programs), or block_cols weight columns gathered (the rest). Every program writes the same O,
so the scratch holds the same values whichever program wrote last. Program 0 writes the count
and the overflow flag.
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
BLOCK_COLS = 256  # weight columns (output features) per program


class OutlierOperands(NamedTuple):
    """The outlier terms' operands on the static slot list (module docstring)."""

    x_o: jax.Array  # [M, C] x.dtype
    xq: jax.Array  # [M, K] int8: the input xq with the live slots' columns zeroed
    w_o: jax.Array  # [C, N] ("kn") or [N, C] ("nk") int8
    slots: jax.Array  # [C] int32 column indices (0 past the count)
    count: jax.Array  # [1] int32: outlier columns in the batch
    overflow: jax.Array  # [1] int32: 1 when count > capacity


def outlier_operands_reference(x, xq, wq, col_flags, *, capacity: int, slots_n: int,
                               weight_layout: str) -> OutlierOperands:
    """Plain jnp of the kernel's outputs (the routes' XLA formulation before it)."""
    col_mask = col_flags > 0
    slots, valid = reference.outlier_columns(col_mask, slots_n)
    valid = valid & (jnp.arange(slots_n) < capacity)
    count = jnp.sum(col_mask, dtype=jnp.int32)
    x_o = jnp.where(valid[None, :], jnp.take(x, slots, axis=1), 0).astype(x.dtype)
    live = jnp.zeros(xq.shape[1], bool).at[slots].max(valid)  # the columns in live slots
    xq = jnp.where(live[None, :], jnp.int8(0), xq)
    if weight_layout == "nk":
        w_o = jnp.where(valid[None, :], jnp.take(wq, slots, axis=1), 0)
    else:
        w_o = jnp.where(valid[:, None], jnp.take(wq, slots, axis=0), 0)
    return OutlierOperands(x_o, xq, w_o.astype(jnp.int8), slots, count.reshape(1),
                           (count > capacity).astype(jnp.int32).reshape(1))


def _load(ref, index, mask):
    return plgpu.load(ref.at[index], mask=mask, other=0)


def _operands_kernel(flags_ref, x_ref, xq_in_ref, w_ref, x_o_ref, xq_ref, w_o_ref, slots_ref,
                     count_ref, overflow_ref, *, capacity: int, nk_layout: bool,
                     row_programs: int, block_rows: int, block_cols: int, interpret: bool):
    del xq_in_ref  # aliased to xq_ref: the activation pass's xq on entry
    m, k = x_ref.shape
    n = w_ref.shape[0] if nk_layout else w_ref.shape[1]
    cp = x_o_ref.shape[1]
    ks = jnp.arange(1 << (k - 1).bit_length())
    flags = (_load(flags_ref, ks, ks < k) > 0).astype(jnp.int32)
    prefix = jnp.cumsum(flags)
    count = jnp.sum(flags)
    slot = jnp.arange(cp)
    live = (flags > 0) & (prefix <= cp)
    plgpu.store(slots_ref.at[jnp.where(live, prefix - 1, cp)], ks, mask=live)
    plgpu.store(slots_ref.at[slot], jnp.zeros_like(slot), mask=slot >= count)
    if not interpret:
        plgpu.debug_barrier()  # this program's slot writes are visible to all its threads
    slots = plgpu.load(slots_ref.at[slot])
    valid = (slot < count) & (slot < capacity)
    pid = pl.program_id(0)

    @pl.when(pid == 0)
    def _totals():
        first = jnp.arange(1)
        plgpu.store(count_ref.at[first], jnp.full((1,), count, jnp.int32))
        plgpu.store(overflow_ref.at[first], jnp.full((1,), count > capacity, jnp.int32))

    @pl.when(pid < row_programs)
    def _rows():
        rows = pid * block_rows + jnp.arange(block_rows)
        row_ok = rows < m
        mask = row_ok[:, None] & valid[None, :]
        at = (rows[:, None], slots[None, :])
        out = (rows[:, None], slot[None, :])
        plgpu.store(x_o_ref.at[out], _load(x_ref, at, mask), mask=row_ok[:, None])
        # Dead slots aim at the first live slot's column (zeroed anyway): interpret mode writes
        # masked-off lanes back with the value they read, which must not land on a live one.
        first = jnp.min(jnp.where(valid, slots, k))
        target = (rows[:, None], jnp.where(valid, slots, first)[None, :])
        live = row_ok[:, None] & (jnp.max(valid.astype(jnp.int32)) > 0)
        plgpu.store(xq_ref.at[target], jnp.zeros((block_rows, cp), jnp.int8), mask=live)

    @pl.when(pid >= row_programs)
    def _weight_columns():
        cols = (pid - row_programs) * block_cols + jnp.arange(block_cols)
        col_ok = cols < n
        if nk_layout:
            at, out = (cols[:, None], slots[None, :]), (cols[:, None], slot[None, :])
            mask, store_mask = col_ok[:, None] & valid[None, :], col_ok[:, None]
        else:
            at, out = (slots[:, None], cols[None, :]), (slot[:, None], cols[None, :])
            mask, store_mask = valid[:, None] & col_ok[None, :], col_ok[None, :]
        plgpu.store(w_o_ref.at[out], _load(w_ref, at, mask), mask=store_mask)


@functools.partial(jax.jit, static_argnames=("capacity", "slots_n", "weight_layout", "interpret",
                                             "block_rows", "block_cols", "num_warps"))
def outlier_operands(x, xq, wq, col_flags, *, capacity: int, slots_n: int, weight_layout: str,
                     interpret: bool = False, block_rows: int = BLOCK_ROWS,
                     block_cols: int = BLOCK_COLS, num_warps=None) -> OutlierOperands:
    """x [M, K], xq [M, K] int8, wq [K, N] ("kn") or [N, K] ("nk") int8, col_flags [K] int32
    (nonzero on outlier columns) -> OutlierOperands with slots_n slots, the first
    min(count, capacity) of them live: equal to outlier_operands_reference. xq's buffer is
    reused for the returned xq (XLA copies it first if the caller still uses it)."""
    m, k = x.shape
    nk_layout = weight_layout == "nk"
    n = wq.shape[0] if nk_layout else wq.shape[1]
    wq_k = wq.shape[1] if nk_layout else wq.shape[0]
    if xq.shape != (m, k) or col_flags.shape != (k,) or wq_k != k:
        raise ValueError(f"outlier_operands: x {x.shape}, xq {xq.shape}, wq {wq.shape} "
                         f"({weight_layout}) and col_flags {col_flags.shape} do not agree on K={k}")
    row_programs = pl.cdiv(m, block_rows)
    kernel = functools.partial(_operands_kernel, capacity=capacity, nk_layout=nk_layout,
                               row_programs=row_programs, block_rows=block_rows,
                               block_cols=block_cols, interpret=interpret)
    w_shape = (n, slots_n) if nk_layout else (slots_n, n)
    # 8 warps at K = 8192: 11.5 us against 13.3 with 4 (outlier_operands_probe.py, H100, M = 256)
    warps = num_warps or max(4, min(16, (1 << (k - 1).bit_length()) // 1024))
    x_o, xq, w_o, slots, count, overflow = pl.pallas_call(
        kernel,
        grid=(row_programs + pl.cdiv(n, block_cols),),
        out_shape=(
            jax.ShapeDtypeStruct((m, slots_n), x.dtype),
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct(w_shape, jnp.int8),
            jax.ShapeDtypeStruct((slots_n + 1,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        input_output_aliases={2: 1},
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="jint8_outlier_operands",
    )(col_flags, x, xq, wq)
    return OutlierOperands(x_o, xq, w_o, slots[:slots_n], count, overflow)
