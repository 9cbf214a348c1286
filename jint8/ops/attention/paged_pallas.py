"""Decode attention over a paged KV cache as a Pallas (Triton lowering) kernel: one query token per
sequence reads its keys and values through its block table (paged.py states the layout).

Grid (B, K, P) as the static-cache kernel's (pallas_triton.py): program (b, j, p) takes kv head
j's G query heads of sequence b (padded to >= 16 rows, the MMA's minimum) and the p-th range of
the sequence's positions, which it walks block_s positions a step with an online softmax (running
max m, running sum l, float32 accumulator). Each step looks up the block of every position in
block_tables[b] and reads the slots straight from the pool, so no gathered copy of a sequence's
cache is written (the reference gathers [B, M * Z, K, H] per layer, a whole cache's worth of
traffic twice). Positions past the query's own (and before its sliding window) are never read:
ranges past it do no steps. The P partials are combined by pallas_triton.combine.

The cache write stays outside (paged.paged_write, a scatter XLA runs in place), so this kernel
only reads the pool and any layout of writes before it is allowed.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.attention.pallas_triton import (BLOCK_S, combine, num_splits, online_softmax_step, query_rows,
                                              walk_and_store)
from jint8.ops.attention.reference import MASKED_LOGIT


def _kernel(q_ref, k_ref, v_ref, tables_ref, positions_ref, acc_ref, m_ref, l_ref, *, layer: int,
            scale: float, groups: int, block_size: int, block_s: int, positions_per_split: int,
            sliding_window: Optional[int], logit_softcap: Optional[float]):
    b, j, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows_p, h = acc_ref.shape[3], acc_ref.shape[4]
    max_positions = tables_ref.shape[1] * block_size
    rows, hs = jnp.arange(rows_p), jnp.arange(h)
    heads = j * groups + rows
    q = plgpu.load(q_ref.at[b, heads[:, None], hs[None, :]], mask=(rows < groups)[:, None], other=0)

    position = plgpu.load(positions_ref.at[b + jnp.zeros((1,), jnp.int32)])[0]
    first = p * positions_per_split
    lowest = 0 if sliding_window is None else position - sliding_window + 1
    start = jnp.maximum(first, lowest)
    # a padding query (position -1) has last = 0: no steps, l = 0, zeroed after the combine
    last = jnp.minimum(jnp.minimum(first + positions_per_split, max_positions), position + 1)

    def step(i, carry):
        ss = start + i * block_s + jnp.arange(block_s)
        ok = ss < last
        blocks = plgpu.load(tables_ref.at[b, ss // block_size], mask=ok, other=0)
        slots = blocks * block_size + ss % block_size  # rows of the pool's [P * Z] slot axis
        k = plgpu.load(k_ref.at[layer, slots[:, None], j, hs[None, :]], mask=ok[:, None], other=0)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        if logit_softcap is not None:
            logits = jnp.tanh(logits / logit_softcap) * logit_softcap
        logits = jnp.where(ok[None, :], logits, MASKED_LOGIT)
        return online_softmax_step(carry, logits, lambda: plgpu.load(
            v_ref.at[layer, slots[:, None], j, hs[None, :]], mask=ok[:, None], other=0))

    steps = jnp.maximum(pl.cdiv(last - start, block_s), 0)
    walk_and_store(steps, step, (acc_ref, m_ref, l_ref), b, j, p)


@functools.partial(jax.jit, static_argnames=("layer", "scale", "sliding_window", "logit_softcap",
                                             "block_s", "num_warps", "num_stages", "target_programs",
                                             "interpret"))
def paged_decode_attention_pallas(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                                  block_tables: jax.Array, positions: jax.Array, *, layer: int,
                                  scale: float, sliding_window: Optional[int] = None,
                                  logit_softcap: Optional[float] = None, block_s: int = BLOCK_S,
                                  num_warps: int = 4, num_stages: int = 2,
                                  target_programs: int = 128, interpret: bool = False) -> jax.Array:
    """softmax(q k^T * scale) v of one query per sequence over its cached positions <= its own.

    Args:
      q: [B, N, H] (16-bit), already rotated.
      k_pool, v_pool: [L, P, Z, K, H], this step's keys and values already written.
      block_tables: [B, M] int32, positions: [B] int32 (-1: a padding row, whose output is zero).
      block_s, num_warps, num_stages, target_programs: as pallas_triton.decode_attention_pallas
        (the same defaults: one step covers block_s positions, several of the pool's blocks).
    Returns:
      out [B, N, H] in q's dtype, what paged_attention_reference gives for T = 1.
    """
    b, n, h = q.shape
    layers, pool_blocks, block_size, kv_heads, _ = k_pool.shape
    groups = n // kv_heads
    rows_p = query_rows(groups)
    max_positions = block_tables.shape[1] * block_size
    splits = num_splits(b, kv_heads, max_positions, block_s, target_programs)
    positions_per_split = pl.cdiv(pl.cdiv(max_positions, splits), block_s) * block_s
    splits = pl.cdiv(max_positions, positions_per_split)
    # [L, P * Z, K, H]: a slot is one row index, so a step's block_s positions may span blocks
    flat = (layers, pool_blocks * block_size, kv_heads, h)
    kernel = functools.partial(_kernel, layer=layer, scale=scale, groups=groups, block_size=block_size,
                               block_s=block_s, positions_per_split=positions_per_split,
                               sliding_window=sliding_window, logit_softcap=logit_softcap)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jint8_paged_decode_attention",
    )(q, k_pool.reshape(flat), v_pool.reshape(flat), block_tables.astype(jnp.int32),
      positions.astype(jnp.int32))
    out = combine(acc, m, l, groups)
    # padding rows: l = 0 made 0 / 0; the reference gives them zeros
    out = jnp.where((positions >= 0)[:, None, None, None], out, 0.0)
    return out.reshape(b, n, h).astype(q.dtype)
