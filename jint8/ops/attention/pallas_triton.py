"""Decode attention over a static KV cache as a Pallas (Triton lowering) kernel (flash-decoding).

Grid (B, K, P): program (b, j, p) takes kv head j's G query heads of sequence b (padded to >= 16
rows, the MMA's minimum) and the p-th range of cache slots, which it walks in block_s steps with an
online softmax (running max m, running sum l, float32 accumulator), stopping at the last slot in
use (num_slots: cache_index + 1; later ranges do no work). The P partial (m, l, acc) are combined
by a small XLA fusion: out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.

Why: an XLA decode step runs attention as two dot fusions plus softmax fusions per layer (about
10 us of a Llama-3-8B layer's ~125 us on the H100, benchmarks/RESULTS.md); this is one kernel that
reads the layer's cache slots in use once, plus the combine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.attention.reference import MASKED_LOGIT

BLOCK_S = 64
_TARGET_PROGRAMS = 128  # about one per SM of an H100 (132)


def query_rows(groups: int) -> int:
    """Rows of a program's query tile: the G heads of one kv head, padded to >= 16 (int MMA)."""
    return max(16, 1 << (groups - 1).bit_length())


def num_splits(batch: int, kv_heads: int, slots: int, block_s: int = BLOCK_S) -> int:
    """Slot ranges per (sequence, kv head): enough programs to cover the GPU, >= block_s slots each."""
    return max(1, min(pl.cdiv(slots, block_s), _TARGET_PROGRAMS // (batch * kv_heads)))


def _kernel(q_ref, k_ref, v_ref, valid_ref, num_slots_ref, acc_ref, m_ref, l_ref, *,
            layer: int, scale: float, groups: int, block_s: int, slots_per_split: int):
    b, j, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows_p = acc_ref.shape[3]
    s_total, h = k_ref.shape[2], k_ref.shape[4]
    rows, hs = jnp.arange(rows_p), jnp.arange(h)
    row_ok = rows < groups
    q = plgpu.load(q_ref.at[b, j * groups + rows[:, None], hs[None, :]], mask=row_ok[:, None],
                   other=0)
    num_slots = plgpu.load(num_slots_ref.at[jnp.arange(1)])[0]
    first = p * slots_per_split
    last = jnp.minimum(jnp.minimum(first + slots_per_split, s_total), num_slots)

    def step(i, carry):
        m, l, acc = carry
        ss = first + i * block_s + jnp.arange(block_s)
        ok = ss < last
        k = plgpu.load(k_ref.at[layer, b, ss[:, None], j, hs[None, :]], mask=ok[:, None], other=0)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        valid = plgpu.load(valid_ref.at[b, ss], mask=ok, other=0) > 0
        logits = jnp.where(valid[None, :], logits, MASKED_LOGIT)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        alpha = jnp.exp(m - m_new)
        probs = jnp.exp(logits - m_new[:, None])
        l = l * alpha + jnp.sum(probs, axis=1)
        v = plgpu.load(v_ref.at[layer, b, ss[:, None], j, hs[None, :]], mask=ok[:, None], other=0)
        pv = jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[:, None] + pv

    init = (jnp.full((rows_p,), MASKED_LOGIT, jnp.float32), jnp.zeros((rows_p,), jnp.float32),
            jnp.zeros((rows_p, h), jnp.float32))
    steps = jnp.maximum(pl.cdiv(last - first, block_s), 0)
    m, l, acc = jax.lax.fori_loop(0, steps, step, init)
    plgpu.store(acc_ref.at[b, j, p, rows[:, None], hs[None, :]], acc)
    plgpu.store(m_ref.at[b, j, p, rows], m)
    plgpu.store(l_ref.at[b, j, p, rows], l)


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_s", "interpret"))
def decode_attention_pallas(q, k_cache, v_cache, valid, num_slots, *, layer: int, scale: float,
                            block_s: int = BLOCK_S, interpret: bool = False):
    """Attention of q [B, N, H] over cache layer `layer` (k, v [L, B, S, K, H]) at the slots with
    valid[b, s] among the first num_slots ([] int32) -> [B, N, H] in q's dtype."""
    b, n, h = q.shape
    s, kv_heads = k_cache.shape[2], k_cache.shape[3]
    groups = n // kv_heads
    rows_p = query_rows(groups)
    splits = num_splits(b, kv_heads, s, block_s)
    slots_per_split = pl.cdiv(pl.cdiv(s, splits), block_s) * block_s
    splits = pl.cdiv(s, slots_per_split)
    kernel = functools.partial(_kernel, layer=layer, scale=scale, groups=groups, block_s=block_s,
                               slots_per_split=slots_per_split)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jint8_decode_attention",
    )(q, k_cache, v_cache, valid.astype(jnp.int32), jnp.reshape(num_slots, (1,)).astype(jnp.int32))
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, K, P, R]
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.sum(weight * l, axis=2)[..., None]
    return out[:, :, :groups].reshape(b, n, h).astype(q.dtype)
