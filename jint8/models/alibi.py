"""ALiBi (Press et al., "Train Short, Test Long"): a per-head linear bias on attention logits
instead of position embeddings; BLOOM and Falcon's ALiBi variants (falcon-rw) use it.

transformers builds the bias from the 2-D attention mask, not from position ids: the key in slot s
of row b sits at position cumsum(mask[b])[s] - 1 (padding and holes in the mask do not count), and
the bias is slope[h] * that position. Softmax is invariant to a per-query constant, so jint8 adds
slope[h] * (key position - query position) instead: the same probabilities, with biases near 0 for
the nearby keys that matter (transformers' absolute biases grow with the context length and lose
precision in 16-bit logits). Query positions come from the same mask, so a cached decode step sees
exactly the biases a full forward over the same slots does.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
    """[num_heads] float32 slopes, transformers' _get_alibi_slopes (geometric in 2^(-8/n), with
    the odd powers of the next power of two's base when num_heads is not one). Powers of its
    float32 base, correctly rounded (torch's vectorised powf can differ by one ulp)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float64(np.float32(2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))))
    slopes = base ** np.arange(1, 1 + closest)
    if closest != num_heads:
        extra_base = np.float64(np.float32(2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * remaining, 2)])
    return slopes.astype(np.float32)


def key_positions(num_slots: int, kv_mask: Optional[jax.Array]) -> jax.Array:
    """[B or 1, S] int32 ALiBi position of every slot: the count of valid slots before it."""
    if kv_mask is None:
        return jnp.arange(num_slots, dtype=jnp.int32)[None]
    return jnp.cumsum(kv_mask.astype(jnp.int32), axis=1) - 1


def alibi_bias(slopes: np.ndarray, num_queries: int, num_slots: int, *, cache_index=0,
               kv_mask: Optional[jax.Array] = None) -> jax.Array:
    """[B or 1, N, T, S] float32 bias for queries in slots cache_index.. over slots 0..S-1."""
    keys = key_positions(num_slots, kv_mask)
    queries = jax.lax.dynamic_slice_in_dim(keys, cache_index, num_queries, axis=1)
    distance = (keys[:, None, :] - queries[:, :, None]).astype(jnp.float32)  # [B, T, S]
    return jnp.asarray(slopes, jnp.float32)[None, :, None, None] * distance[:, None]
