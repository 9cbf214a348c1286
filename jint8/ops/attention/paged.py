"""Attention over a paged KV cache in plain jnp: the CPU path and the truth for a paged kernel.

The pool holds every sequence's keys and values in fixed-size blocks, k, v [L, P, Z, K, H]
(P blocks of Z slots). Sequence b owns the blocks block_tables[b] [M] in order, so its position
p lives in block block_tables[b, p // Z] at offset p % Z. Block 0 is scratch: padding tokens
(position -1) are written there and no sequence reads it as valid, which keeps every write a
fixed-shape scatter (no data-dependent shapes under jit).

Queries q [B, T, N, H] carry their positions [B, T] (-1: padding); query (b, t) sees the
sequence's positions s <= positions[b, t] (and s > positions[b, t] - window with a sliding
window); a padding query's output is zero. Logits and softmax in float32, probabilities cast to
the value dtype for the second product, as decode_attention_reference does, so a paged decode
kernel can be held to this.

A pool may hold its values' bits rather than the values (pool_storage_dtype: 16-bit floats as
uint16 on the CPU), the values' dtype then passed as `dtype=`: XLA's CPU backend has no 16-bit
float scatter and turns each layer's write into float32 conversions of the whole pool and back,
every step, where a uint16 scatter writes only the new slots, in place. Reads reinterpret the
gathered slots, never the pool.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jint8.errors import ShapeError
from jint8.ops.attention.reference import MASKED_LOGIT

SCRATCH_BLOCK = 0


def pool_storage_dtype(dtype, platform: str):
    """The dtype a pool of `dtype` values is kept in on `platform` ("cpu", "gpu", ...): uint16
    bits for 16-bit floats on the CPU (the module docstring says why), else dtype itself."""
    dtype = jnp.dtype(dtype)
    if platform == "cpu" and dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.uint16)
    return dtype


def _values_dtype(pool: jax.Array, dtype):
    if dtype is None or jnp.dtype(dtype) == pool.dtype:
        return None
    if jnp.dtype(dtype).itemsize != pool.dtype.itemsize:
        raise ShapeError(f"a {pool.dtype} pool cannot hold the bits of {jnp.dtype(dtype)} values "
                         f"(dtype={jnp.dtype(dtype)}): the widths differ")
    return jnp.dtype(dtype)


def paged_write(pool: jax.Array, new: jax.Array, block_tables: jax.Array, positions: jax.Array, *,
                layer: int, dtype=None) -> jax.Array:
    """pool [L, P, Z, K, H] with new [B, T, K, H] written at each token's position of layer `layer`
    (padding, position < 0, into the scratch block). A scatter: in place under jit when donated.
    dtype: the values' dtype when the pool holds their bits (default: the pool's own)."""
    block_size = pool.shape[2]
    safe = jnp.maximum(positions, 0)
    blocks = jnp.take_along_axis(block_tables, safe // block_size, axis=1)  # [B, T]
    blocks = jnp.where(positions >= 0, blocks, SCRATCH_BLOCK)
    offsets = jnp.where(positions >= 0, safe % block_size, 0)
    values_dtype = _values_dtype(pool, dtype)
    if values_dtype is None:
        return pool.at[layer, blocks, offsets].set(new.astype(pool.dtype))
    bits = jax.lax.bitcast_convert_type(new.astype(values_dtype), pool.dtype)
    return pool.at[layer, blocks, offsets].set(bits)


def gather_sequences(pool: jax.Array, block_tables: jax.Array, *, layer: int, dtype=None) -> jax.Array:
    """Layer `layer`'s slots of each sequence in position order: [B, M * Z, K, H] (in dtype when
    the pool holds its values' bits)."""
    # one gather with the layer as an index: no copy of the layer's slice of the pool first
    gathered = pool[layer, block_tables]  # [B, M, Z, K, H]
    values_dtype = _values_dtype(pool, dtype)
    if values_dtype is not None:
        gathered = jax.lax.bitcast_convert_type(gathered, values_dtype)
    b, m, z = gathered.shape[:3]
    return gathered.reshape(b, m * z, *gathered.shape[3:])


def paged_attention_reference(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_tables: jax.Array,
                              positions: jax.Array, *, layer: int, scale: float,
                              sliding_window: Optional[int] = None,
                              logit_softcap: Optional[float] = None, dtype=None) -> jax.Array:
    """softmax(q k^T * scale) v over each sequence's cached positions -> [B, T, N, H] (q.dtype).
    dtype: the cached values' dtype when the pools hold their bits."""
    b, t, n, h = q.shape
    keys = gather_sequences(k_pool, block_tables, layer=layer, dtype=dtype)
    values = gather_sequences(v_pool, block_tables, layer=layer, dtype=dtype)
    kv_heads = keys.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    slots = jnp.arange(keys.shape[1])[None, None, :]
    query_positions = positions[:, :, None]
    visible = slots <= query_positions
    if sliding_window is not None:
        visible = visible & (slots > query_positions - sliding_window)
    logits = jnp.where(visible[:, None, None], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, values, preferred_element_type=jnp.float32)
    # Padding queries see nothing; their output is zero rather than an average of whatever the
    # blocks held before, so what padding rows feed into a batch (LLM.int8's outlier columns are
    # a union over rows) does not depend on the pool's history.
    out = jnp.where((positions >= 0)[:, :, None, None, None], out, 0.0)
    return out.reshape(b, t, n, h).astype(q.dtype)
