"""Pieces every causal-LM family shares: norms, RoPE, masked attention, the static and paged KV caches.

Shapes: B batch, T new tokens, S cache slots, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jint8.errors import UnsupportedArchitectureError
from jint8.layers import Int8Dense, NormedInput
from jint8.models import explicit_axes
from jint8.models.alibi import alibi_bias
from jint8.numerics import rms_norm
from jint8.ops import attention as attention_ops
from jint8.ops.int8_matmul import InputNorm

# ----------------------------------------------------------------------------- activations

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    """The jax function for a transformers `hidden_act` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"hidden_act={name!r} is not supported (known: {sorted(ACTIVATIONS)})"
        ) from None


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 like transformers (Gemma: * (1 + w), `unit_offset`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, defer: bool = False):
        """The normalised x; with defer=True a NormedInput instead, which Int8Dense layers fold
        into their int8 kernel (the decode kernel normalises the x it loads anyway)."""
        init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        if defer:
            return NormedInput(x, InputNorm(scale, self.eps, self.unit_offset), jnp.dtype(self.dtype))
        return rms_norm(x, scale, eps=self.eps, unit_offset=self.unit_offset, dtype=self.dtype)


# ----------------------------------------------------------------------------- rotary embeddings


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding: theta, rotated dims, and transformers' rope_type scaling parameters."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, hf_config) -> "RopeConfig":
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy = getattr(hf_config, "rope_scaling", None)
        if isinstance(legacy, dict):
            params = {**legacy, **params}
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedArchitectureError(
                f"rope_type={rope_type!r} is not supported (known: default, linear, llama3)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in params.items() if k in fields and v is not None}
        extra.pop("rope_type", None)
        return cls(theta=float(theta), rope_type=rope_type, **extra)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """inv_freq [head_dim // 2] float32, scaled as transformers' ROPE_INIT_FUNCTIONS[rope_type]."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] of positions [B, T], cast to the activation dtype as transformers does."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


# ----------------------------------------------------------------------------- KV cache


@struct.dataclass
class KVCache:
    """Static, preallocated keys and values of every layer: k, v [L, B, S, K, H]."""

    k: jax.Array
    v: jax.Array

    @property
    def max_length(self) -> int:
        return int(self.k.shape[2])


def init_cache(config, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """A zero KVCache for `config` (any family's config: num_layers, num_kv_heads, head_dim)."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def update_layer_cache(
    cache: KVCache, layer: int, k: jax.Array, v: jax.Array, cache_index
) -> tuple[KVCache, jax.Array, jax.Array]:
    """Write k, v [B, T, K, H] at slots cache_index.. of `layer`; return the cache and that layer's
    full keys/values [B, S, K, H]. dynamic_update_slice updates in place under jit (donated cache)."""
    start = (layer, 0, cache_index, 0, 0)
    new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype)[None], start)
    new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype)[None], start)
    return KVCache(new_k, new_v), new_k[layer], new_v[layer]


@struct.dataclass
class PagedKVCache:
    """Keys and values of many sequences in fixed-size blocks (jint8/ops/attention/paged.py):
    k, v [L, P, Z, K, H]; block_tables [B, M] (sequence b's blocks in order); positions [B, T] of
    this call's tokens (-1: padding). A model called with one writes each token at its position
    and attends over its own sequence's positions up to it; cache_index and kv_mask are unused.
    dtype: the cached values' dtype when k, v hold their bits (jint8.ops.attention.paged's
    pool_storage_dtype); None: the pools' own."""

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    positions: jax.Array
    dtype: Any = struct.field(pytree_node=False, default=None)

    @property
    def block_size(self) -> int:
        return int(self.k.shape[2])


def init_paged_pool(config, num_blocks: int, block_size: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Zero k, v block pools [L, num_blocks, block_size, K, H] for `config` (block 0 is scratch)."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def _paged_attention(q, k, v, *, layer, cache: PagedKVCache, scale, sliding_window, logit_softcap, rope):
    if rope is not None:
        q, k = attention_ops.rotate(q, *rope), attention_ops.rotate(k, *rope)
    write = dict(block_tables=cache.block_tables, positions=cache.positions, layer=layer, dtype=cache.dtype)
    new_k = attention_ops.paged_write(cache.k, k, **write)
    new_v = attention_ops.paged_write(cache.v, v, **write)
    out = attention_ops.paged_attention(q, new_k, new_v, cache.block_tables, cache.positions, layer=layer,
                                        scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
                                        dtype=cache.dtype)
    return out, cache.replace(k=new_k, v=new_v)


# ----------------------------------------------------------------------------- attention


def attention_mask(
    num_queries: int,
    num_slots: int,
    *,
    cache_index=0,
    kv_mask: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None,
) -> jax.Array:
    """Boolean [B or 1, 1, T, S]: query t (slot cache_index + t) sees slot s <= its own slot where
    kv_mask[b, s], and (sliding window) s > its slot - window."""
    query_slots = cache_index + jnp.arange(num_queries)[:, None]
    key_slots = jnp.arange(num_slots)[None, :]
    mask = key_slots <= query_slots
    if sliding_window is not None:
        mask = mask & (key_slots > query_slots - sliding_window)
    mask = mask[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask.astype(bool)[:, None, None, :]
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: Optional[float] = None,
    bias: Optional[jax.Array] = None,
) -> jax.Array:
    """softmax(q k^T * scale + bias) v with GQA: q [B, T, N, H], k/v [B, S, K, H], mask and
    bias [B|1, 1 or N, T, S].

    jax.nn.dot_product_attention (cuDNN on GPU where it applies, XLA elsewhere); Gemma 2's logit
    soft-capping is not one of its options, so that case is written out in jnp.
    """
    if logit_softcap is None:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=None)
    if bias is not None:
        raise UnsupportedArchitectureError("attention with both a logit soft-cap and a bias is not supported")
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], groups, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layer: int,
    cache: Optional[KVCache],
    cache_index,
    kv_mask: Optional[jax.Array],
    scale: float,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    rope: Optional[tuple[jax.Array, jax.Array]] = None,
    packed: Optional[jax.Array] = None,
    alibi_slopes: Optional[np.ndarray] = None,
) -> tuple[jax.Array, Optional[KVCache]]:
    """Attention of q [B, T, N, H] over this step's k/v [B, T, K, H] (no cache) or, with a cache,
    over the layer's slots after writing k/v at cache_index (a PagedKVCache: at each token's
    position in its sequence's blocks). Returns ([B, T, N, H], cache).

    rope: (cos, sin) [B, T, H] (rope_tables) to rotate q and k by first. packed: the [P, B, T, W]
    split-K partials of the array q, k, v were split from (q|k|v, a fused projection;
    Int8Dense(split_partials=True), P = 1: that array), for the decode kernel to read.
    alibi_slopes: [N] per-head ALiBi slopes (alibi.py): the bias follows the slots' kv_mask, in
    decode steps too (through XLA: the decode kernel takes no bias).
    """
    if isinstance(cache, PagedKVCache):
        return _paged_attention(q, k, v, layer=layer, cache=cache, scale=scale, sliding_window=sliding_window,
                                logit_softcap=logit_softcap, rope=rope)
    b, t = q.shape[:2]
    if cache is not None and t == 1 and logit_softcap is None and alibi_slopes is None and (
            cache.k.dtype == q.dtype and attention_ops.unsupported_reason(q[:, 0], cache.k) is None):
        # Decode on an NVIDIA GPU: one Pallas kernel rotates q and k, writes the cache slot and
        # attends over the slots in use (no XLA kernels for RoPE or the cache update).
        mask = attention_mask(1, cache.max_length, cache_index=cache_index, kv_mask=kv_mask,
                              sliding_window=sliding_window)
        valid = jnp.broadcast_to(mask[:, 0, 0], (b, cache.max_length))
        out, new_k, new_v = attention_ops.decode_attention_step(
            q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, valid, cache_index, layer=layer, scale=scale,
            rope=None if rope is None else (rope[0][:, 0], rope[1][:, 0]),
            packed=None if packed is None else packed[:, :, 0])
        return out[:, None], KVCache(new_k, new_v)
    if rope is not None:
        q, k = attention_ops.rotate(q, *rope), attention_ops.rotate(k, *rope)
    if cache is None:
        keys, values, index = k, v, 0
    else:
        cache, keys, values = update_layer_cache(cache, layer, k, v, cache_index)
        keys, values, index = keys.astype(q.dtype), values.astype(q.dtype), cache_index
    mask = attention_mask(q.shape[1], keys.shape[1], cache_index=index, kv_mask=kv_mask,
                          sliding_window=sliding_window)
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, q.shape[1], keys.shape[1], cache_index=index, kv_mask=kv_mask)
    return dot_product_attention(q, keys, values, mask, scale=scale, logit_softcap=logit_softcap,
                                 bias=bias), cache


def causal_lm_logits(backbone, lm_head, input_ids, positions, cache, cache_index, kv_mask, logits_to_keep=0):
    """The shared body of every *ForCausalLM.__call__ -> (float32 logits, cache).

    backbone(input_ids, positions, cache, cache_index, kv_mask) -> (hidden, cache), with
    backbone.attend(hidden) for tied embeddings (lm_head None). logits_to_keep > 0 keeps the last
    that many positions only (transformers' name): a prefill that needs one next token skips the
    [B, T, vocab] head matmul.
    """
    b, t = input_ids.shape
    if positions is None:
        positions = default_positions(b, t, cache_index)
    if cache is not None and cache_index is None:
        cache_index = 0
    hidden, cache = backbone(input_ids, positions, cache, cache_index, kv_mask)
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    logits = backbone.attend(hidden) if lm_head is None else lm_head(hidden)
    return logits.astype(jnp.float32), cache


class CausalLM(explicit_axes.RunsOnAutoAxes, nn.Module):
    """The shared *ForCausalLM: input_ids [B, T] -> (logits [B, T, vocab] float32, cache).

    A subclass names its backbone (BACKBONE: the decoder stack's class, built from the config;
    BACKBONE_NAME: its parameter name in transformers' checkpoints, "model" or "transformer")
    and gets an int8-able lm_head unless config.tie_word_embeddings. positions [B, T] are the
    RoPE / learned positions (default cache_index + t); with a cache the new keys and values go
    to slots cache_index.. and query t sees slots <= cache_index + t where kv_mask
    (causal_lm_logits).
    """

    BACKBONE: ClassVar[type]
    BACKBONE_NAME: ClassVar[str] = "model"
    config: Any

    def setup(self):
        setattr(self, self.BACKBONE_NAME, self.BACKBONE(self.config))
        if not self.config.tie_word_embeddings:
            self.lm_head = Int8Dense(self.config.vocab_size, use_bias=False, dtype=self.config.dtype,
                                     param_dtype=self.config.dtype)

    def __call__(self, input_ids, positions=None, cache: Optional[KVCache] = None, cache_index=None,
                 kv_mask=None, logits_to_keep: int = 0):
        lm_head = None if self.config.tie_word_embeddings else self.lm_head
        return causal_lm_logits(getattr(self, self.BACKBONE_NAME), lm_head, input_ids, positions, cache,
                                cache_index, kv_mask, logits_to_keep)


def default_positions(batch: int, num_tokens: int, cache_index=None) -> jax.Array:
    """[B, T] positions cache_index + t (0 + t without a cache)."""
    start = 0 if cache_index is None else cache_index
    return jnp.broadcast_to(start + jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
