"""Plain-jnp decode attention over a static KV cache: what the Pallas kernel computes.

One query token per sequence (decode), GQA: q [B, N, H] attends over layer `layer` of the cache
k, v [L, B, S, K, H] at the slots where valid[b, s]; the N = K x G query heads of kv head j are
j*G .. j*G + G - 1 (Llama's repeat_kv order). Logits and softmax in float32, the probabilities cast
to the value dtype for the second product (as jax.nn.dot_product_attention's XLA path does).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# A finite "minus infinity": a row whose slots are all invalid so far keeps finite arithmetic
# (its partial sums are wiped by exp(-1e30 - m) = 0 once a valid slot arrives).
MASKED_LOGIT = -1e30


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE of x [..., heads, H] by cos/sin [..., H] in x.dtype (transformers' rotate_half
    convention and its 16-bit ops: x * cos + rotate_half(x) * sin). The one definition the
    models and the decode kernel's reference use."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def decode_attention_reference(q, k_cache, v_cache, valid, *, layer: int, scale: float):
    """softmax(q k^T * scale, masked by valid) v for one query token per sequence -> [B, N, H]."""
    b, n, h = q.shape
    keys, values = k_cache[layer], v_cache[layer]  # [B, S, K, H]
    groups = n // keys.shape[2]
    qg = q.reshape(b, keys.shape[2], groups, h)
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, keys, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, None, None, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h).astype(q.dtype)


def decode_step_reference(q, k, v, k_cache, v_cache, valid, cache_index, cos: Optional[jax.Array] = None,
                          sin: Optional[jax.Array] = None, *, layer: int, scale: float):
    """What the kernel's decode step computes: q [B, N, H], k/v [B, K, H] rotated by cos/sin [B, H]
    (if given), k/v written at slot cache_index of cache layer `layer`, then attention.
    Returns (out [B, N, H], k_cache, v_cache)."""
    if cos is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    start = (layer, 0, cache_index, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None, :, None], start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None, :, None], start)
    out = decode_attention_reference(q, k_cache, v_cache, valid, layer=layer, scale=scale)
    return out, k_cache, v_cache
