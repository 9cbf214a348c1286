"""One decode step's attention over a static KV cache as a Pallas (Triton lowering) kernel
(flash-decoding), with the step's RoPE and cache write folded in.

Grid (B, K, P): program (b, j, p) takes kv head j's G query heads of sequence b (padded to >= 16
rows, the MMA's minimum) and the p-th range of cache slots, which it walks in block_s steps with an
online softmax (running max m, running sum l, float32 accumulator), stopping at the step's own slot
(cache_index; later ranges do no work). On the way in:
  - q, k, v of the step are read where the projections wrote them: one fused q|k|v array at
    column offsets (Columns), so XLA copies no slices out, or three arrays; or the fused
    projection's S split-K partials [S, B, W] (float32), added in order where they are loaded
    and rounded once to the activation dtype, so no XLA reduction runs between the two kernels;
  - with RoPE tables (cos, sin [B, H] in the activation dtype) q and k are rotated
    (rotate_half convention; both products and their sum rounded to the activation dtype, as
    transformers' 16-bit ops and reference.rotate do);
  - the program whose slot range holds cache_index writes the rotated key and the value into
    the cache (aliased in place) and uses them for that slot from registers, so no program reads
    a slot another one writes.
So XLA runs no RoPE or cache-update kernels for the step. The P partials (m, l, acc) are combined by
one XLA fusion (combine: the max and sums over P written out as elementwise ops, which XLA fuses
with the slicing of the padded rows).

Why: an XLA decode step ran attention as two dot fusions plus softmax fusions per layer, then (with
the kernel but RoPE and the cache write outside it) 3 small XLA kernels for RoPE and the two cache
updates plus 2 for the combine; docs/decisions.md (D14) has the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.ops.attention.reference import MASKED_LOGIT
from jint8.ops.rounding import round_to

BLOCK_S = 64
_TARGET_PROGRAMS = 128  # about one per SM of an H100 (132)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where head i's vector of q, k and v starts in its 2-D source [B, width]: col + i * H."""

    q: int = 0
    k: int = 0
    v: int = 0


def query_rows(groups: int) -> int:
    """Rows of a program's query tile: the G heads of one kv head, padded to >= 16 (int MMA)."""
    return max(16, 1 << (groups - 1).bit_length())


def num_splits(batch: int, kv_heads: int, slots: int, block_s: int = BLOCK_S,
               target_programs: int = _TARGET_PROGRAMS) -> int:
    """Slot ranges per (sequence, kv head): enough programs to cover the GPU, >= block_s slots each."""
    return max(1, min(pl.cdiv(slots, block_s), target_programs // (batch * kv_heads)))


def _load_heads(ref, b, cols, dtype, *, interpret: bool, **masked):
    """ref[b, cols] of a 2-D source [B, W]; of partials [S, B, W] their float32 sum over S (in
    order), rounded once to dtype (what XLA's partials.sum(0).astype(dtype) rounds)."""
    if len(ref.shape) == 2:
        return plgpu.load(ref.at[b, cols], **masked)
    total = plgpu.load(ref.at[0, b, cols], **masked).astype(jnp.float32)
    for s in range(1, ref.shape[0]):
        total = total + plgpu.load(ref.at[s, b, cols], **masked).astype(jnp.float32)
    return round_to(total, dtype, explicit=interpret)


class _Rope:
    """Loads head vectors [rows, H] from a 2-D source (or its [S, B, W] partials), rotated by the
    sequence's RoPE (or not), in dtype."""

    def __init__(self, cos_ref, sin_ref, b, h: int, dtype, *, interpret: bool):
        self.interpret, self.dtype = interpret, dtype
        self.hs = hs = jnp.arange(h)
        if cos_ref is None:
            self.cos = None
            return
        half = h // 2
        self.partner = jnp.where(hs < half, hs + half, hs - half)  # rotate_half's source column
        self.sign = jnp.where(hs < half, -1.0, 1.0)
        self.cos = plgpu.load(cos_ref.at[b, hs]).astype(jnp.float32)[None, :]
        self.sin = plgpu.load(sin_ref.at[b, hs]).astype(jnp.float32)[None, :]

    def load(self, ref, b, starts, row_ok=None):
        """The vectors at columns starts[r] + 0..H-1 of row b, [len(starts), H]."""
        # Triton rejects `other` without a mask
        masked = {} if row_ok is None else dict(mask=row_ok[:, None], other=0)
        load = functools.partial(_load_heads, ref, b, dtype=self.dtype, interpret=self.interpret,
                                 **masked)
        x = load(starts[:, None] + self.hs[None, :])
        if self.cos is None:
            return x
        partner = load(starts[:, None] + self.partner[None, :])
        rounded = functools.partial(round_to, dtype=x.dtype, explicit=self.interpret)
        # x * cos + rotate_half(x) * sin, each product and the sum in x.dtype (products of two
        # 16-bit floats are exact in float32, so one cast rounds each correctly).
        straight = rounded(x.astype(jnp.float32) * self.cos).astype(jnp.float32)
        turned = rounded(self.sign[None, :] * partner.astype(jnp.float32) * self.sin)
        return rounded(straight + turned.astype(jnp.float32))


def online_softmax_step(carry, logits, load_v):
    """One step of the online softmax over a tile of slots: carry (m, l, acc) [R], [R], [R, H]
    float32, logits [R, S] float32 (masked slots at MASKED_LOGIT); load_v() -> v [S, H] is read
    after the logits' max and sum, as the kernels' loops order their loads."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp(m - m_new)
    probs = jnp.exp(logits - m_new[:, None])
    l = l * alpha + jnp.sum(probs, axis=1)
    v = load_v()
    pv = jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, l, acc * alpha[:, None] + pv


def walk_and_store(steps, step, partial_refs, b, j, p):
    """Runs step(i, (m, l, acc)) for i < steps from the empty softmax state and stores the
    program's partials at [b, j, p] of partial_refs = (acc [B, K, P, R, H], m, l [B, K, P, R])."""
    acc_ref, m_ref, l_ref = partial_refs
    rows_p, h = acc_ref.shape[3], acc_ref.shape[4]
    rows, hs = jnp.arange(rows_p), jnp.arange(h)
    init = (jnp.full((rows_p,), MASKED_LOGIT, jnp.float32), jnp.zeros((rows_p,), jnp.float32),
            jnp.zeros((rows_p, h), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, steps, step, init)
    plgpu.store(acc_ref.at[b, j, p, rows[:, None], hs[None, :]], acc)
    plgpu.store(m_ref.at[b, j, p, rows], m)
    plgpu.store(l_ref.at[b, j, p, rows], l)


def _kernel(q_ref, k_ref, v_ref, *refs, columns: Columns, has_rope: bool, layer: int,
            scale: float, groups: int, block_s: int, slots_per_split: int, dtype, interpret: bool):
    cos_ref, sin_ref = refs[:2] if has_rope else (None, None)
    k_cache_ref, v_cache_ref, valid_ref, index_ref, acc_ref, m_ref, l_ref, k_out_ref, v_out_ref = (
        refs[2:] if has_rope else refs)
    b, j, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows_p = acc_ref.shape[3]
    s_total, h = k_cache_ref.shape[2], k_cache_ref.shape[4]
    rows = jnp.arange(rows_p)
    rope = _Rope(cos_ref, sin_ref, b, h, dtype, interpret=interpret)
    hs = rope.hs
    q = rope.load(q_ref, b, columns.q + (j * groups + rows) * h, rows < groups)
    one = jnp.zeros((1,), jnp.int32)
    k_new = rope.load(k_ref, b, columns.k + j * h + one)  # [1, H]
    v_new = _load_heads(v_ref, b, columns.v + j * h + one[:, None] + hs[None, :], dtype,
                        interpret=interpret)

    slot = plgpu.load(index_ref.at[jnp.arange(1)])[0]
    first = p * slots_per_split
    last = jnp.minimum(jnp.minimum(first + slots_per_split, s_total), slot + 1)
    owner = (first <= slot) & (slot < first + slots_per_split)
    writes = jnp.broadcast_to(owner, (1, h))
    plgpu.store(k_out_ref.at[layer, b, slot + one[:, None], j, hs[None, :]],
                k_new.astype(k_out_ref.dtype), mask=writes)
    plgpu.store(v_out_ref.at[layer, b, slot + one[:, None], j, hs[None, :]],
                v_new.astype(v_out_ref.dtype), mask=writes)

    # The step's own slot comes from registers: whole tiles, built once outside the loop.
    k_fill = jnp.broadcast_to(k_new.astype(k_cache_ref.dtype), (block_s, h))
    v_fill = jnp.broadcast_to(v_new.astype(v_cache_ref.dtype), (block_s, h))

    def step(i, carry):
        ss = first + i * block_s + jnp.arange(block_s)
        ok = ss < last
        mine = (ss == slot)[:, None]  # the step's own slot: not read back from memory
        k = plgpu.load(k_cache_ref.at[layer, b, ss[:, None], j, hs[None, :]], mask=ok[:, None], other=0)
        k = jnp.where(mine, k_fill, k)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        valid = plgpu.load(valid_ref.at[b, ss], mask=ok, other=0) > 0
        logits = jnp.where(valid[None, :], logits, MASKED_LOGIT)

        def load_v():
            v = plgpu.load(v_cache_ref.at[layer, b, ss[:, None], j, hs[None, :]], mask=ok[:, None], other=0)
            return jnp.where(mine, v_fill, v)

        return online_softmax_step(carry, logits, load_v)

    steps = jnp.maximum(pl.cdiv(last - first, block_s), 0)
    walk_and_store(steps, step, (acc_ref, m_ref, l_ref), b, j, p)


def combine(acc, m, l, groups: int):
    """The P partials [B, K, P, R, (H)] of the kernel -> [B, K, G, H] float32 attention.

    out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p, M = max_p m_p. The max and the sums over
    P are unrolled into elementwise ops so XLA fuses the whole combine (and the slicing of the
    padding rows) into one kernel; a jnp.max/jnp.sum over P made it two.
    """
    acc, m, l = acc[:, :, :, :groups], m[:, :, :, :groups], l[:, :, :, :groups]
    parts = range(m.shape[2])
    top = functools.reduce(jnp.maximum, [m[:, :, p] for p in parts])
    weights = [jnp.exp(m[:, :, p] - top) for p in parts]
    numerator = functools.reduce(operator.add, [w[..., None] * acc[:, :, p] for p, w in zip(parts, weights)])
    denominator = functools.reduce(operator.add, [w * l[:, :, p] for p, w in zip(parts, weights)])
    return numerator / denominator[..., None]


@functools.partial(jax.jit, static_argnames=("columns", "num_heads", "layer", "scale", "block_s",
                                             "num_warps", "num_stages", "target_programs", "dtype",
                                             "interpret"))
def decode_attention_pallas(q_src, k_src, v_src, k_cache, v_cache, valid, cache_index,
                            cos: Optional[jax.Array] = None, sin: Optional[jax.Array] = None, *,
                            columns: Columns, num_heads: int, layer: int, scale: float,
                            block_s: int = BLOCK_S, num_warps: int = 4, num_stages: int = 2,
                            target_programs: int = _TARGET_PROGRAMS, dtype=None,
                            interpret: bool = False):
    """One query token per sequence attends over cache layer `layer` after its own key and value
    are written at slot cache_index.

    Args:
      q_src, k_src, v_src: [B, width] sources of the step's q (num_heads heads), k and v (K heads),
        head i at columns columns.<q|k|v> + i * H (the same array thrice for a fused q|k|v); or
        [S, B, width] split-K partials (float32) of such a source, summed where they are read.
      k_cache, v_cache: [L, B, S, K, H]; written at [layer, :, cache_index] (in place under an
        outer jit that no longer needs the old cache, as a decode step).
      valid: [B, S] bool, the slots each sequence attends to (cache_index's included).
      cache_index: [] int32, the step's slot.
      cos, sin: optional [B, H] RoPE tables in q's dtype: q and k are rotated first.
      block_s, num_warps, num_stages: a program's slots per step and Triton's launch parameters;
        target_programs: the programs to aim for, over batch x kv heads x slot ranges (the
        defaults were the fastest tools/attention_tiles.py timed: docs/decisions.md, D14).
      dtype: the activation dtype (default q_src's): partials are rounded to it, and out is in it.
    Returns:
      (out [B, num_heads, H] in dtype, k_cache, v_cache).
    """
    dtype = jnp.dtype(dtype or q_src.dtype)
    b = q_src.shape[-2]
    _, _, s, kv_heads, h = k_cache.shape
    groups = num_heads // kv_heads
    rows_p = query_rows(groups)
    splits = num_splits(b, kv_heads, s, block_s, target_programs)
    slots_per_split = pl.cdiv(pl.cdiv(s, splits), block_s) * block_s
    splits = pl.cdiv(s, slots_per_split)
    has_rope = cos is not None
    kernel = functools.partial(_kernel, columns=columns, has_rope=has_rope, layer=layer, scale=scale,
                               groups=groups, block_s=block_s, slots_per_split=slots_per_split,
                               dtype=dtype, interpret=interpret)
    operands = [q_src, k_src, v_src, *((cos, sin) if has_rope else ()), k_cache, v_cache,
                valid.astype(jnp.int32), jnp.reshape(cache_index, (1,)).astype(jnp.int32)]
    first_cache = 5 if has_rope else 3
    acc, m, l, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={first_cache: 3, first_cache + 1: 4},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jint8_decode_attention",
    )(*operands)
    out = combine(acc, m, l, groups).reshape(b, num_heads, h).astype(dtype)
    return out, k_cache, v_cache
